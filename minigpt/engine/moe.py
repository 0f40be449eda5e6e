"""Mixture-of-experts layers on DeepSpeed's MoE (`deepspeed.moe.layer.MoE`) with expert parallelism.

The model (`minigpt.model.MoEFeedForward`) names its weights `router.weight`, `experts.N.*` and
`shared.N.*`. Here each such layer is swapped, before `deepspeed.initialize`, for `DeepSpeedMoEFeedForward`:
the same router weight becomes DeepSpeed's gate (`moe.deepspeed_moe.gate.wg.weight`) and this rank's
share of the experts its local experts (`moe.deepspeed_moe.experts.deepspeed_experts.I.*`, expert
`ep_rank * local + I`), with DeepSpeed's gate configured to the model's maths (`minigpt.model.route`:
no noise, no second-expert sampling, no random token selection). `portable.plain_name` maps the DeepSpeed names
back, which is how checkpoints and `final/` stay engine-neutral.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from minigpt.model import MoEFeedForward, MoEStats, router_z_loss


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

