"""Training objectives: the mode-specific maths the loop calls, one small class per mode.

An objective names the dataset kind it reads, turns a micro-batch into a scalar loss (plus a few
statistics to log), and evaluates on validation batches. The loop never branches on the mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minigpt.data.datasets import IGNORE_INDEX, PretrainWindows, SFTExamples


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): the bits-per-byte denominator."""
    lengths = []
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(token_id)
        if tokenizer.sp.is_control(token_id) or tokenizer.sp.is_unknown(token_id):
            lengths.append(0)
        elif tokenizer.sp.is_byte(token_id):
            lengths.append(1)
        elif piece in ("<|im_start|>", "<|im_end|>"):
            lengths.append(0)
        else:
            lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.float64)


@dataclass
class EvalTotals:
    """Sums over validation batches, reduced across ranks before they become metrics."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    bytes: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_tensor(self) -> torch.Tensor:
        """[loss_sum, tokens, bytes, *extra values in sorted key order]."""
        extra = [self.extra[name] for name in sorted(self.extra)]
        return torch.tensor([self.loss_sum, self.tokens, self.bytes, *extra], dtype=torch.float64)


class LanguageModeling:
    """Next-token cross-entropy on positions whose label is not -100 (pretrain windows, SFT answers)."""

    def __init__(self, dataset_kind: str, byte_lengths: torch.Tensor | None = None):
        self.dataset_kind = dataset_kind
        self.byte_lengths = byte_lengths

    def dataset(self, reader, seq_len: int, tokenizer):
        """The map-style dataset this objective trains on, over one shard."""
        if self.dataset_kind == "pretrain":
            return PretrainWindows(reader, seq_len)
        return SFTExamples(reader, seq_len, pad_id=tokenizer.pad_id)

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = engine(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        labels = batch["labels"].flatten()
        # Sum / count rather than mean: a micro-batch with no trained token (all -100) gives 0, not NaN.
        total = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1), {}

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], totals: EvalTotals) -> None:
        logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        labels = batch["labels"].flatten()
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="none")
        kept = labels != IGNORE_INDEX
        totals.loss_sum += losses[kept].double().sum().item()
        totals.tokens += kept.sum().item()
        if self.byte_lengths is not None:
            totals.bytes += self.byte_lengths[labels[kept].cpu()].sum().item()

    @staticmethod
    def metrics(totals: torch.Tensor) -> dict[str, float]:
        loss_sum, tokens, num_bytes = totals.tolist()
        metrics = {"val_loss": loss_sum / max(tokens, 1.0)}
        if num_bytes > 0:
            metrics["val_bpb"] = loss_sum / math.log(2) / num_bytes
        return metrics


def dataset_kind(mode: str) -> str:
    """The shard kind (`meta.json` "kind") a mode trains on (a reward model learns from preference pairs)."""
    return "dpo" if mode == "reward" else mode


def build_objective(mode: str, tokenizer, cfg):
    """The objective for `mode`."""
    if mode == "pretrain":
        return LanguageModeling("pretrain", token_byte_lengths(tokenizer))
    if mode == "sft":
        return LanguageModeling("sft", token_byte_lengths(tokenizer))
    if mode == "dpo":
        from minigpt.train.dpo import DPO

        return DPO(cfg.dpo_beta, reference_in_memory=cfg.dpo_reference_in_memory, sft_coef=cfg.dpo_sft_coef)
    if mode == "reward":
        from minigpt.train.reward import RewardModeling

        return RewardModeling()
    if mode == "rlhf":
        from minigpt.train.rlhf import GRPO

        return GRPO(cfg, tokenizer)
    raise NotImplementedError(f"--mode {mode} is not implemented")
