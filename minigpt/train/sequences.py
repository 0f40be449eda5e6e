"""Helpers over token sequences shared by the post-training objectives (DPO, reward model, RLHF).

They live apart from any one objective so that the objectives import this module, never each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.config import ConfigError
from minigpt.data.datasets import IGNORE_INDEX
from minigpt.engine.device import autocast_context
from minigpt.i18n import _


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over positions whose label is not -100: (B, T, V), (B, T) -> (B,) fp32.

    `labels` are already the next tokens (position t of the logits predicts labels[:, t])."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -losses.view(labels.shape).sum(-1)


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """1 where the chosen side wins, 0 where it loses, 0.5 on a tie (so an untrained policy scores chance)."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def has_response(labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the sequence kept at least one response token (a prompt longer than the context keeps none)."""
    return (labels != IGNORE_INDEX).any(-1)


class FrozenReference(torch.nn.Module):
    """A frozen model whose forward runs in the policy's precision (autocast), so a reference scores exactly
    as the policy's engine would score the same weights: a bf16 policy compared with an fp32 reference would
    start with a log-ratio that is rounding, not learning, and a resumed run would recompute different
    reference log-probs than the run it continues."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str):
        super().__init__()
        self.model, self.device, self.precision = model, device, precision

    def forward(self, *args, **kwargs):
        with autocast_context(self.device, self.precision):
            return self.model(*args, **kwargs)


def load_frozen_model(model_dir: Path | None, device: torch.device, mode: str, precision: str = "fp32",
                      policy: torch.nn.Module | None = None) -> torch.nn.Module:
    """A frozen copy of the run's starting weights on `device` (the DPO/RLHF reference policy), run at the
    policy's `precision`. A LoRA `policy` (--lora-rank) is its own reference with its adapters switched off:
    its frozen weights are the starting weights, so no second copy is loaded."""
    from minigpt.weights import load_consolidated

    if policy is not None and any(".lora_" in name for name, _param in policy.named_parameters()):
        from minigpt.lora import AdaptersOff

        return FrozenReference(AdaptersOff(policy), device, precision)

    if model_dir is None:
        raise ConfigError(_("--mode {mode} needs starting weights for its reference; pass --init-from").format(
            mode=mode))
    model = load_consolidated(model_dir, device=device)[0]
    model.eval()
    model.requires_grad_(False)
    return FrozenReference(model, device, precision).eval()
