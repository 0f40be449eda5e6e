"""Mixture of experts on the plain path: routing maths on a hand-computed case, DeepSpeed's own gate as the
reference, shared experts, the load-balancing loss through the objective, config fields and presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_factory import seeded_model, small_test_config

from minigpt.config import PRESETS, ConfigError, MiniGPTConfig, TrainConfig, get_config
from minigpt.engine.plain import PlainEngine
from minigpt.model import MiniGPT, MoEFeedForward, route
from minigpt.train.language_modeling import Pretraining

# Three tokens, three experts, router probabilities chosen so every number below is checked by hand.
PROBS = torch.tensor([[0.50, 0.30, 0.20],    # first choice e0, second e1
                      [0.10, 0.60, 0.30],    # first e1, second e2
                      [0.25, 0.60, 0.15]])   # first e1, second e0
LOGITS = PROBS.log()
# mean gate per expert (0.85, 1.5, 0.65) / 3; share of first choices (1, 2, 0) / 3
AUX = 3 * (0.85 / 3 * 1 / 3 + 1.5 / 3 * 2 / 3 + 0.65 / 3 * 0)


def moe_config(**overrides) -> MiniGPTConfig:
    return small_test_config(vocab_size=64, **{"num_experts": 4, "experts_per_token": 2, "num_shared_experts": 1,
                                               "ffn_hidden_size": 32, **overrides})


def test_top2_routes_each_token_to_its_two_likeliest_experts_with_renormalised_weights():
    routing = route(LOGITS, k=2)
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0],
                             [0.0, 0.6 / 0.9, 0.3 / 0.9],
                             [0.25 / 0.85, 0.6 / 0.85, 0.0]])
    torch.testing.assert_close(routing.weights, expected)
    assert routing.mask.tolist() == (expected > 0).tolist()
    assert routing.counts.tolist() == [2, 3, 1]
    assert routing.aux_loss.item() == pytest.approx(AUX)  # 1.2833: unbalanced (1.0 is balanced)


def test_top1_keeps_the_raw_gate_probability_and_the_same_balance_loss():
    routing = route(LOGITS, k=1)
    torch.testing.assert_close(routing.weights, torch.tensor([[0.5, 0, 0], [0, 0.6, 0], [0, 0.6, 0]]))
    assert routing.aux_loss.item() == pytest.approx(AUX)


def test_a_uniform_router_scores_a_balance_loss_of_one():
    assert route(torch.zeros(8, 4), k=2).aux_loss.item() == pytest.approx(1.0)
    assert route(torch.zeros(8, 4), k=3).aux_loss.item() == pytest.approx(1.0)


def test_capacity_drops_later_tokens_first_choices_before_second_ones():
    # capacity = ceil(3 tokens / 3 experts x 2 x 0.5) = 1 route per expert
    routing = route(LOGITS, k=2, capacity_factor=0.5)
    torch.testing.assert_close(routing.weights, torch.tensor([[1.0, 0, 0], [0, 0.6 / 0.9, 0.3 / 0.9], [0, 0, 0]]))
    assert routing.counts.tolist() == [2, 3, 1], "counts are the router's choices, before dropping"


@pytest.mark.parametrize(("k", "capacity_factor"), [(1, 0.0), (2, 0.0), (3, 0.0), (2, 1.0), (2, 0.5), (3, 0.75)])
def test_routing_is_deepspeed_topkgate_maths(k, capacity_factor):
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="compares with DeepSpeed's own gate")
    torch.manual_seed(k)
    tokens = torch.randn(40, 8)
    gate = sharded_moe.TopKGate(8, 5, k=k, capacity_factor=capacity_factor or 1.0,
                                eval_capacity_factor=capacity_factor or 1.0, min_capacity=1,
                                drop_tokens=bool(capacity_factor), use_rts=False, top2_2nd_expert_sampling=False)
    aux, combine, dispatch, counts = gate(tokens)
    routing = route(F.linear(tokens, gate.wg.weight), k, capacity_factor)
    assert torch.equal(routing.weights, combine.sum(-1))
    assert torch.equal(routing.mask, dispatch.any(-1))
    assert torch.equal(routing.aux_loss, aux)
    assert routing.counts.tolist() == counts.tolist()


def test_moe_layer_sums_weighted_routed_experts_and_the_always_on_shared_expert():
    torch.manual_seed(0)
    layer = MoEFeedForward(moe_config(num_experts=3))
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        out = layer(x)
        routing = route(F.linear(x[0], layer.router.weight), 2)
        expected = layer.shared[0](x[0]) + sum(routing.weights[:, e, None] * layer.experts[e](x[0]) for e in range(3))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert layer.stats.counts.sum().item() == 5 * 2


def test_a_token_dropped_by_capacity_still_gets_the_shared_expert():
    torch.manual_seed(0)
    layer = MoEFeedForward(moe_config(num_experts=3, moe_capacity_factor=0.5))
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        routing = route(F.linear(x[0], layer.router.weight), 2, 0.5)
        dropped = (~routing.mask.any(1)).nonzero().flatten()
        out = layer(x)
    assert dropped.numel() >= 1
    torch.testing.assert_close(out[0, dropped], layer.shared[0](x[0, dropped]))


def test_pretraining_loss_adds_the_weighted_balance_loss_and_logs_expert_shares():
    config = moe_config(moe_aux_loss_weight=0.1, moe_z_loss_weight=0.01)
    engine = PlainEngine(seeded_model(config), TrainConfig.of(precision="fp32"), torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 9))
    loss, stats = Pretraining().loss(engine, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    layers = engine.module.moe_stats()
    aux = sum(s.aux_loss for s in layers) / 2
    z_loss = sum(s.z_loss for s in layers) / 2
    assert loss.item() == pytest.approx(stats["lm_loss"] + 0.1 * aux.item() + 0.01 * z_loss.item(), rel=1e-6)
    assert stats["moe_aux_loss"] == pytest.approx(aux.item())
    shares = [stats[f"moe_load/l0_e{e}"] for e in range(4)]
    assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
    loss.backward()
    assert engine.module.blocks[0].ffn.router.weight.grad.abs().sum() > 0, "the router learns from the loss"


def test_a_dense_model_adds_nothing_and_logs_no_moe_stats():
    engine = PlainEngine(seeded_model(small_test_config(64)), TrainConfig.of(precision="fp32"), torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 9))
    loss, stats = Pretraining().loss(engine, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    assert stats == {}


def test_a_few_plain_steps_lower_the_loss_and_keep_every_expert_in_use():
    torch.manual_seed(0)
    config = moe_config()
    engine = PlainEngine(MiniGPT(config), TrainConfig.of(precision="fp32", learning_rate=3e-3, warmup_steps=0),
                         torch.device("cpu"))
    ids = (torch.arange(4 * 17).reshape(4, 17) * 3) % 64
    losses = []
    for _ in range(10):
        loss, stats = Pretraining().loss(engine, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        engine.backward(loss)
        engine.step()
        losses.append(stats["lm_loss"])
    assert losses[-1] < losses[0] - 0.5
    assert all(0 < stats[f"moe_load/l{layer}_e{e}"] for layer in range(2) for e in range(4))


def test_dense_config_json_without_moe_fields_still_loads_dense():
    old = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "ffn_hidden_size": 128, "max_seq_len": 64, "rope_theta": 10000.0, "norm_eps": 1e-5, "dropout": 0.0,
           "tie_embeddings": True}
    config = MiniGPTConfig.from_dict(old)
    assert config.num_experts == 0 and not config.is_moe
    assert config.num_params() == MiniGPT(config).num_params()


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(num_experts=4, experts_per_token=5), "experts_per_token=5 must be from 1 to num_experts=4"),
    (dict(num_experts=4, experts_per_token=0), "experts_per_token=0 must be from 1 to num_experts=4"),
    (dict(num_experts=-1), "num_experts must be an integer from 0 to 1024"),
    (dict(num_experts=4, moe_aux_loss_weight=-0.1), "moe_aux_loss_weight must be a number >= 0"),
    (dict(num_experts=4, moe_capacity_factor=float("nan")), "moe_capacity_factor must be a number >= 0"),
    (dict(num_experts=4, experts_per_token=1, moe_capacity_factor=1.0), "needs experts_per_token >= 2"),
])
def test_bad_moe_fields_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_test_config(64, **overrides)


def test_moe_presets_have_the_requested_shape_and_exact_parameter_counts():
    moe = get_config("moe")
    assert (moe.hidden_size, moe.num_layers, moe.num_heads, moe.num_kv_heads, moe.ffn_hidden_size,
            moe.max_seq_len) == (384, 12, 12, 3, 1536, 1024)
    assert (moe.num_experts, moe.experts_per_token, moe.num_shared_experts, moe.moe_aux_loss_weight) == (4, 2, 1, 0.1)
    tiny_moe = get_config("tiny-moe")
    assert tiny_moe.num_params() == MiniGPT(tiny_moe).num_params()
    # active: the 2 routed + 1 shared experts a token goes through, not the 2 idle ones
    idle = 2 * tiny_moe.num_layers * 3 * tiny_moe.hidden_size * tiny_moe.ffn_hidden_size
    assert tiny_moe.active_params() == tiny_moe.num_params() - idle
    for name in ("tiny", "small", "medium", "shakespeare"):
        assert PRESETS[name].num_experts == 0, "dense presets stay dense"


def test_a_moe_model_loads_into_the_generator_from_consolidated_weights(tmp_path):
    from minigpt.weights import load_consolidated, save_consolidated

    model = seeded_model(moe_config()).eval()
    save_consolidated(tmp_path / "final", model.state_dict(), model.config, None)
    loaded, _ = load_consolidated(tmp_path / "final")
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)


def test_ep_size_must_divide_world_and_experts_and_zero3_is_refused():
    from minigpt.engine import ds_config as moe

    assert moe.resolve_ep_size(0, world_size=2, num_experts=4, zero_stage=2) == 2
    assert moe.resolve_ep_size(0, world_size=4, num_experts=6, zero_stage=1) == 2
    assert moe.resolve_ep_size(1, world_size=2, num_experts=4, zero_stage=2) == 1
    with pytest.raises(ConfigError, match="--ep-size 3 must divide the world size \\(2\\) and the expert count"):
        moe.resolve_ep_size(3, world_size=2, num_experts=4, zero_stage=2)
    with pytest.raises(ConfigError, match="--ep-size 4 must divide the world size"):
        moe.resolve_ep_size(4, world_size=2, num_experts=4, zero_stage=2)
    with pytest.raises(ConfigError, match="ZeRO stage 0, 1 or 2"):
        moe.resolve_ep_size(0, world_size=2, num_experts=4, zero_stage=3)


def _pair_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two preference pairs over `ids` (4 rows): responses are the last 3 tokens of each row."""
    labels = ids.clone()
    labels[:, :-3] = -100
    return {"chosen_input_ids": ids[:2], "rejected_input_ids": ids[2:], "chosen_labels": labels[:2],
            "rejected_labels": labels[2:], "reference_logps": torch.zeros(2, 2)}


def _objective_loss(mode: str, model: torch.nn.Module, ids: torch.Tensor):
    from minigpt.train.dpo import DPO
    from minigpt.train.reward import RewardModel, RewardModeling
    from minigpt.train.rlhf import GRPO, Rollout

    if mode == "reward":
        model = RewardModel(model)
    engine = PlainEngine(model, TrainConfig.of(precision="fp32"), torch.device("cpu"))
    if mode == "dpo":
        return DPO(beta=0.1).loss(engine, _pair_batch(ids)), engine
    if mode == "reward":
        return RewardModeling().loss(engine, _pair_batch(ids)), engine
    cfg = TrainConfig.of(mode="rlhf", rl_group_size=2, kl_coef=0.05)
    mask = torch.ones_like(ids)
    rollout = Rollout(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1), prompt_len=6,
                      response_mask=torch.ones(4, 3), old_logprobs=torch.full((4, 3), -4.0),
                      rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]), reference_logprobs=torch.full((4, 3), -4.0))
    return GRPO(cfg.options, tokenizer=None).loss(engine, rollout), engine


@pytest.mark.parametrize("mode", ["dpo", "reward", "rlhf"])
def test_post_training_objectives_add_the_balance_loss_and_log_expert_shares(mode):
    """DPO, the reward model and GRPO keep a mixture of experts balanced as pretraining and SFT do: the
    weighted router losses are added to the mode's loss, logged, and reach the router's gradient."""
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    (without, stats_without), _ = _objective_loss(mode, seeded_model(moe_config(moe_aux_loss_weight=0.0)), ids)
    (loss, stats), engine = _objective_loss(mode, seeded_model(moe_config(moe_aux_loss_weight=0.1,
                                                                          moe_z_loss_weight=0.01)), ids)
    assert stats["moe_aux_loss"] == pytest.approx(stats_without["moe_aux_loss"], rel=1e-6)  # same weights
    assert loss.item() - without.item() == pytest.approx(0.1 * stats["moe_aux_loss"] + 0.01 * stats["moe_z_loss"],
                                                         rel=1e-4)
    assert sum(stats[f"moe_load/l0_e{e}"] for e in range(4)) == pytest.approx(1.0)
    own = {"dpo": "dpo_loss", "reward": "reward_loss", "rlhf": "policy_loss"}[mode]  # the mode's loss alone
    assert stats[own] == pytest.approx(without.item(), rel=1e-5)
    loss.backward()
    router = next(m for m in engine.module.modules() if hasattr(m, "moe_stats")).blocks[0].ffn.router
    assert router.weight.grad.abs().sum() > 0
