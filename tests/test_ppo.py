"""PPO (`--mode rlhf --rl-algo ppo`): GAE by hand, the clipped value loss, per-token KL rewards, whitening,
the options it refuses, the critic kept out of final/, and training that stops and resumes bitwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from stop_request import StopAtStep

from minigpt.config import PRESETS, ConfigError, TrainConfig
from minigpt.data.tasks import write_task_files
from minigpt.model import MiniGPT
from minigpt.modes import build_objective
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.train.loop import Trainer
from minigpt.train.ppo import (
    PPO,
    PolicyWithValue,
    clipped_value_loss,
    generalized_advantages,
    token_rewards,
    whiten,
)
from minigpt.train.rlhf import GRPO
from minigpt.weights import load_consolidated, save_consolidated

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
STEPS, STOP_AT = 4, 2


def test_gae_matches_a_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.3, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [0.2, 0.6, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response has 2 tokens; 9.0, 7.0 padding
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 1: delta = (-0.14, 0.32, 0.2); A_2 = 0.2, A_1 = 0.32 + 0.45 * 0.2, A_0 = -0.14 + 0.45 * A_1.
    # Row 2: the state after its last token is terminal: delta_1 = 1.0 - 0.6, delta_0 = 0.3 + 0.9 * 0.6 - 0.2.
    torch.testing.assert_close(advantages, torch.tensor([[0.0445, 0.41, 0.2], [0.82, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.5445, 0.81, 1.0], [1.02, 1.0, 0.0]]))
    # gamma = lambda = 1: Monte Carlo, the return is the sum of the rewards still to come.
    _advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [1.3, 1.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_on_each():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -5.0]])
    reference = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -3.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 0.5]), logprobs, reference, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.0], [0.0, -0.2 + 0.5, 0.0]]))


def test_whitened_advantages_have_zero_mean_and_unit_std_over_response_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = whiten(values, mask)
    kept = out[mask.bool()]
    assert abs(kept.mean().item()) < 1e-6 and abs(kept.std(correction=0).item() - 1) < 1e-5
    assert out[~mask.bool()].abs().max() == 0


def test_value_loss_is_clipped_around_the_rollouts_values():
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 1.0, -1.0]])
    values = torch.tensor([[0.1, 0.5, 0.5]], requires_grad=True)  # inside, beyond towards, beyond away
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    assert clipped.tolist() == [[0.0, 1.0, 1.0]]
    torch.testing.assert_close(loss[0, 0], torch.tensor(0.5 * 0.9 ** 2))
    torch.testing.assert_close(loss[0, 1], torch.tensor(0.5 * 0.8 ** 2))  # clipped to 0.2: the larger error
    torch.testing.assert_close(loss[0, 2], torch.tensor(0.5 * 1.5 ** 2))  # moving away is not forgiven
    loss.sum().backward()
    assert values.grad[0, 1] == 0  # beyond the clip towards the target: no push further
    assert values.grad[0, 0] < 0 and values.grad[0, 2] > 0


@pytest.mark.parametrize("flags, message", [
    (dict(rl_algo="grpo", rl_gae_lambda=0.5), "--rl-gae-lambda applies to --rl-algo ppo, not to --rl-algo grpo"),
    (dict(rl_algo="ppo", rl_scale_rewards="batch"), "--rl-scale-rewards applies to --rl-algo grpo"),
    (dict(rl_group_size=1), "--rl-group-size must be at least 2 for GRPO"),
    (dict(rl_algo="a2c"), "--rl-algo must be one of grpo, ppo"),
    (dict(rl_algo="ppo", rl_gamma=1.5), "--rl-gamma must be in"),
    (dict(rl_algo="ppo", rl_value_clip=0.0), "--rl-value-clip must be positive"),
])
def test_bad_rl_options_are_refused_in_one_line_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.of(mode="rlhf", **flags)


def test_rl_algo_picks_the_objective_and_each_its_default_group_size():
    grpo = TrainConfig.of(mode="rlhf")
    ppo = TrainConfig.of(mode="rlhf", rl_algo="ppo")
    assert isinstance(build_objective(grpo, None), GRPO) and build_objective(grpo, None).group_size == 8
    assert isinstance(build_objective(ppo, None), PPO) and build_objective(ppo, None).group_size == 1
    assert build_objective(ppo.replace(rl_group_size=4), None).group_size == 4


def test_the_policy_with_a_value_head_is_still_the_language_model_to_its_callers():
    torch.manual_seed(0)
    policy = MiniGPT(dataclasses.replace(SMALL, vocab_size=40)).eval()
    model = PolicyWithValue(policy).eval()
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(model(ids), policy(ids))
    logits, values = model(ids, values=True)
    torch.testing.assert_close(logits, policy(ids))
    assert values.shape == (2, 7) and values.dtype == torch.float32
    torch.testing.assert_close(model.token_logprobs(ids), policy.token_logprobs(ids))


def test_final_holds_the_language_model_alone(tmp_path, data_tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size)
    model = PolicyWithValue(MiniGPT(config))
    with torch.no_grad():
        model.value_head.bias.fill_(3.0)
    objective = build_objective(TrainConfig.of(mode="rlhf", rl_algo="ppo"), data_tokenizer)
    out = objective.save_consolidated(tmp_path / "final", model.state_dict(), config, data_tokenizer.directory)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert not any("value_head" in key or key.startswith("policy.") for key in saved)
    loaded, _tokenizer = load_consolidated(out)
    ids = torch.randint(0, config.vocab_size, (1, 6))
    torch.testing.assert_close(loaded.eval()(ids), model.policy.eval()(ids))


# -- training through the real Trainer -----------------------------------------------------------------
def rows(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == split]


@pytest.fixture
def ppo_setup(tmp_path, data_tokenizer, monkeypatch):
    """A PPO config on the sort task, starting from a saved 2-layer model (standing in for an SFT run)."""
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    files = write_task_files(tmp_path / "tasks", 48, seed=0, tasks=("sort",))
    torch.manual_seed(0)
    start = MiniGPT(dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size))
    save_consolidated(tmp_path / "sft" / "final", start.state_dict(), start.config, data_tokenizer.directory,
                      extra={"mode": "sft"})

    def config(out: str, **changes) -> TrainConfig:
        settings = dict(mode="rlhf", rl_algo="ppo", config="tiny", data=[str(files["rlhf"])],
                        data_dir=str(tmp_path), init_from=str(tmp_path / "sft"), seq_len=48, batch_size=4,
                        rl_max_new_tokens=4, rl_updates=2, max_steps=STEPS, warmup_steps=1, eval_interval=0,
                        eval_batches=1, save_interval=0, log_interval=100, sample_prompt="a",
                        learning_rate=3e-3, out=str(tmp_path / out))
        return TrainConfig.of(**{**settings, **changes})

    return config


def test_ppo_trains_stops_on_a_signal_and_resumes_bitwise(ppo_setup, tmp_path):
    assert Trainer(ppo_setup("whole")).run() == EXIT_FINISHED
    whole = rows(tmp_path / "whole", "train")
    assert [r["step"] for r in whole] == list(range(STEPS))
    assert all(r["value_loss"] > 0 and r["loss"] == r["loss"] for r in whole)
    assert {"val_reward", "val_exact", "val_response_length"} <= set(rows(tmp_path / "whole", "val")[-1])
    saved = torch.load(tmp_path / "whole" / "final" / "model.pt", weights_only=True)
    assert not any("value_head" in key for key in saved)

    trainer = Trainer(ppo_setup("stopped"))
    assert trainer.run(StopAtStep(trainer, STOP_AT)) == EXIT_PREEMPTED
    assert Trainer(ppo_setup("stopped", auto_resume=True)).run() == EXIT_FINISHED
    resumed = rows(tmp_path / "stopped", "train")
    assert [r["step"] for r in resumed] == list(range(STEPS))
    # The critic is in the checkpoint: its loss after the resume is the uninterrupted run's, bit for bit.
    for name in ("loss", "value_loss", "policy_loss", "reward", "kl"):
        assert [r[name] for r in resumed] == [r[name] for r in whole], name


def test_ppo_with_lora_adapters_writes_the_merged_language_model_alone(ppo_setup, tmp_path):
    pytest.importorskip("peft", reason="--lora-rank needs the lora extra (peft)")
    assert Trainer(ppo_setup("lora", lora_rank=4, rl_updates=1)).run() == EXIT_FINISHED
    assert all(r["value_loss"] > 0 for r in rows(tmp_path / "lora", "train"))
    saved = torch.load(tmp_path / "lora" / "final" / "model.pt", weights_only=True)
    assert not any("value_head" in key or "lora" in key or key.startswith("policy.") for key in saved)
    assert (tmp_path / "lora" / "final" / "adapter" / "adapter_model.safetensors").is_file()
