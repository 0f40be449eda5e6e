"""Mixture-of-experts layers on DeepSpeed's MoE (`deepspeed.moe.layer.MoE`) with expert parallelism.

The model (`minigpt.model.MoEFeedForward`) names its weights `router.weight`, `experts.N.*` and
`shared.N.*`. Here each such layer is swapped, before `deepspeed.initialize`, for `DeepSpeedMoEFeedForward`:
the same router weight becomes DeepSpeed's gate (`moe.deepspeed_moe.gate.wg.weight`) and this rank's
share of the experts its local experts (`moe.deepspeed_moe.experts.deepspeed_experts.I.*`, expert
`ep_rank * local + I`), with DeepSpeed's gate configured to the model's maths (`minigpt.model.route`:
no noise, no second-expert sampling, no random token selection). `plain_name` maps the DeepSpeed names
back, which is how checkpoints and `final/` stay engine-neutral.
"""

from __future__ import annotations

import math

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from minigpt.config import ConfigError
from minigpt.engine.portable import is_expert_name, plain_name  # noqa: F401  (re-exported)
from minigpt.model import MoEFeedForward, MoEStats, router_z_loss


def resolve_ep_size(requested: int, world_size: int, num_experts: int, zero_stage: int) -> int:
    """The expert-parallel size: `requested` (--ep-size) checked, or the largest divisor of both (0)."""
    if zero_stage == 3:
        raise ConfigError("mixture-of-experts models train with ZeRO stage 0, 1 or 2: DeepSpeed's MoE layer does "
                          "not partition its experts under ZeRO-3 (use ds_configs/zero2.json)")
    if requested == 0:
        return math.gcd(world_size, num_experts)
    if world_size % requested or num_experts % requested:
        raise ConfigError(f"--ep-size {requested} must divide the world size ({world_size} ranks) and the expert "
                          f"count (num_experts={num_experts})")
    return requested


class DeepSpeedMoEFeedForward(nn.Module):
    """`MoEFeedForward` with its routed experts in a DeepSpeed `MoE` layer (this rank's experts only)."""

    def __init__(self, plain: MoEFeedForward, ep_size: int, ep_rank: int):
        super().__init__()
        num_experts, hidden = plain.router.weight.shape
        self.num_local = num_experts // ep_size
        self.moe = MoE(hidden, plain.experts[0],
                       num_experts=num_experts, ep_size=ep_size, k=plain.k,
                       capacity_factor=plain.capacity_factor or 1.0, eval_capacity_factor=plain.capacity_factor or 1.0,
                       min_capacity=1, drop_tokens=bool(plain.capacity_factor), use_rts=False,
                       top2_2nd_expert_sampling=False)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(plain.router.weight)
            for local, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                expert.load_state_dict(plain.experts[ep_rank * self.num_local + local].state_dict())
        self.shared = plain.shared
        self.stats: MoEStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux_loss, counts = self.moe(x)
        self.stats = MoEStats(aux_loss, router_z_loss(x, self.moe.deepspeed_moe.gate.wg.weight),
                              counts.detach().float())
        for expert in self.shared:
            out = out + expert(x)
        return out


def use_deepspeed_moe(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Swap every `MoEFeedForward` of `model` for its DeepSpeed form in place; returns how many."""
    swapped = 0
    for block in getattr(model, "blocks", []):
        if isinstance(block.ffn, MoEFeedForward):
            block.ffn = DeepSpeedMoEFeedForward(block.ffn, ep_size, ep_rank)
            swapped += 1
    return swapped

