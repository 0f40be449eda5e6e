"""debug_fullstack is one batch and one step in every mode, on real prompts, with a tokenizer that spells the
prompt's language (the guide's example prompt is Chinese)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from spm_fixture import _ENGLISH

from minigpt.cli import debug_fullstack
from minigpt.config import LORA_TARGETS, PRESETS, TrainConfig, get_config
from minigpt.lora import ADAPTER_DIR, attach_lora, load_adapter_weights, merged_state_dict, read_adapter
from minigpt.model import MiniGPT
from minigpt.signals import EXIT_FINISHED
from minigpt.tokenizer import Tokenizer
from minigpt.tokenizer_training import train_tokenizer
from minigpt.train.loop import Trainer
from minigpt.weights import load_consolidated, save_consolidated

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
QUICK = ["--seq-len", "48", "--batch-size", "2", "--eval-interval", "0", "--log-interval", "100",
         "--rl-group-size", "2", "--rl-max-new-tokens", "4", "--vocab-size", "1200"]
PROMPT = "你好，MiniGPT！"

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def english_pretrain(root: Path) -> Path:
    """A quick start's `checkpoints/pretrain_tiny/final` whose tokenizer never saw Chinese."""
    (root / "en.txt").write_text("\n".join(_ENGLISH * 40), encoding="utf-8")
    tokenizer = train_tokenizer([root / "en.txt"], root / "en_tokenizer", vocab_size=400)
    final = root / "checkpoints" / "pretrain_tiny" / "final"
    model = MiniGPT(get_config("tiny", vocab_size=tokenizer.vocab_size))
    save_consolidated(final, model.state_dict(), model.config, tokenizer.directory, extra={"mode": "pretrain"})
    return final


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="LoRA needs the peft package (the lora extra; .ci/run installs it)")


def walk(mode: str, capsys, *extra: str) -> str:
    code = debug_fullstack.main(["--mode", mode, "--model-size", "tiny", "--prompt", PROMPT, *QUICK, *extra])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return out


def changed_by_the_step(out: str) -> tuple[int, int]:
    """(trainable, frozen) tensors the walk's LoRA section says its step changed."""
    lora = out.split("== LoRA ==\n", 1)[1].splitlines()
    assert lora[0].startswith("trainable tensors changed by the step: ") and lora[1].startswith("frozen tensors")
    return int(lora[0].split(": ")[1].split()[0]), int(lora[1].split(": ")[1].split()[0])


def test_sft_walk_does_not_inherit_a_tokenizer_that_lacks_the_prompts_characters(workdir, capsys):
    english_pretrain(workdir)
    out = walk("sft", capsys)
    assert "debug: checkpoints/pretrain_tiny/final's tokenizer has no pieces for" in out and "--init-from" in out
    tokenizer = Tokenizer(workdir / "data" / "cache" / "debug_tokenizer")
    assert tokenizer.unseen_characters(PROMPT) == ""
    assert "tokenizer data/cache/debug_tokenizer (--tokenizer" in out
    assert f"[user] {PROMPT}" in out


def test_dpo_walk_scores_only_its_batch_with_the_reference(workdir, capsys):
    out = walk("dpo", capsys)
    assert "reference log-probs of" not in out  # nothing precomputed over the data set's pairs
    assert not list((workdir / "checkpoints" / "debug_dpo_tiny").glob("reference*"))
    loss = float(out.split("== one optimizer step ==\nloss ", 1)[1].split()[0])
    assert loss > 0


def test_rlhf_walk_shows_a_real_prompt_and_takes_a_non_zero_step(workdir, capsys):
    reward = TrainConfig.of(mode="reward", seq_len=48, batch_size=2, max_steps=2, warmup_steps=0, eval_interval=0,
                         log_interval=100, vocab_size=1200, out="checkpoints/reward_tiny")
    assert Trainer(reward).run() == EXIT_FINISHED
    capsys.readouterr()
    out = walk("rlhf", capsys, "--init-from", "checkpoints/reward_tiny/initial",
               "--reward-model", "checkpoints/reward_tiny/final")
    raw = out.split("raw text     ", 1)[1]
    assert raw.startswith("'<|im_start|>user\\n") and not raw.startswith("'<pad>")
    step = out.split("== one optimizer step ==\n", 1)[1].split()
    # The first GRPO step's loss is ~0 by construction (zero-mean advantages at ratio 1, no KL yet: it printed
    # -0.0000 once), its gradient is not: the reward model's scores moved the policy.
    assert step[0] == "loss" and step[2] == "grad-norm" and float(step[3]) > 0.0


def test_rlhf_walk_says_why_equal_rewards_give_a_zero_loss(workdir, capsys):
    out = walk("rlhf", capsys)
    step = out.split("== one optimizer step ==\n", 1)[1]
    if step.startswith("loss 0.0000"):
        assert "note: every response of each prompt earned the same reward" in step


def test_ppo_walk_shows_the_critics_values_and_advantages_and_takes_a_step(workdir, capsys):
    out = walk("rlhf", capsys, "--rl-algo", "ppo")
    assert "rlhf: PPO" in out
    batch = out.split("== first batch ==\n", 1)[1].split("== one optimizer step ==", 1)[0]
    assert "old_values" in batch and "advantages" in batch and "returns" in batch
    step = out.split("== one optimizer step ==\n", 1)[1].split()
    assert float(step[1]) != 0.0 and float(step[3]) > 0.0  # the value loss alone makes both non-zero
    assert "GRPO's advantages" not in out


def test_lora_walk_without_trained_weights_adapts_a_full_step_of_its_own(workdir, capsys, peft):
    out = walk("sft", capsys, "--lora-rank", "4")
    base = workdir / "checkpoints" / "debug_sft_tiny_base" / "final"
    assert "no trained weights to adapt" in out and (base / "model.pt").is_file()
    assert f"weights from {base.relative_to(workdir)}" in out
    trainable, frozen = changed_by_the_step(out)
    assert trainable > 0 and frozen == 0
    final = workdir / "checkpoints" / "debug_sft_tiny" / "final"
    merged, _tokenizer = load_consolidated(final)
    adapted, _tokenizer = load_consolidated(base)
    frozen = {k: v.clone() for k, v in adapted.state_dict().items()}
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in LORA_TARGETS for k in changed)
    # final/ is the base plus final/adapter/, merged: W + B·A·alpha/rank
    attach_lora(adapted, 4, 8.0, 0.0, [])
    load_adapter_weights(adapted, read_adapter(final / ADAPTER_DIR), adapted.config)
    expected = merged_state_dict(adapted.state_dict(), 8.0, 4)
    assert all(torch.allclose(v, expected[k], atol=1e-6) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("mode,extra", [("pretrain", ()), ("dpo", ()), ("reward", ()), ("rlhf", ()),
                                        ("rlhf", ("--rl-algo", "ppo"))],
                         ids=["pretrain", "dpo", "reward", "rlhf-grpo", "rlhf-ppo"])
def test_lora_walk_trains_only_adapters_in_every_mode_that_takes_them(workdir, capsys, peft, mode, extra):
    out = walk(mode, capsys, "--lora-rank", "4", *extra)
    assert "LoRA rank 4, alpha 8 on qkv_proj" in out
    trainable, frozen = changed_by_the_step(out)
    assert trainable > 0 and frozen == 0
    assert (workdir / "checkpoints" / f"debug_{mode}_tiny" / "final" / "adapter" / "adapter_config.json").is_file()


def test_lora_walk_from_trained_weights_takes_no_base_step(workdir, capsys, peft):
    final = english_pretrain(workdir)
    out = walk("pretrain", capsys, "--lora-rank", "4", "--init-from", str(final))
    assert "no trained weights to adapt" not in out
    assert not (workdir / "checkpoints" / "debug_pretrain_tiny_base").exists()
    trainable, frozen = changed_by_the_step(out)
    assert trainable > 0 and frozen == 0
