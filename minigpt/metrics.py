"""Metrics training and evaluation share: named sums reduced across ranks by name (adding a metric can never
shift another one), and the bytes each token stands for (the bits-per-byte denominator).

Every rank adds into sums with the same names (the objective declares its evaluation sums up front;
a training step's statistics carry the same keys on every call), and `reduce_by_name` all-reduces
them as one tensor in sorted-name order, the order every rank agrees on without talking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from minigpt.i18n import _


class MetricSums(dict):
    """Sums over batches, keyed by name; only the names declared at construction may be added to.

    Declaring the names keeps the key set identical on every rank (a rank that saw no batch still
    holds zeros), which the by-name reduction relies on."""

    def __init__(self, names: Iterable[str]):
        super().__init__((name, 0.0) for name in names)

    def add(self, name: str, value: float | torch.Tensor) -> None:
        if name not in self:
            raise KeyError(_("metric sum {name!r} is not declared (declared: {declared})").format(
                name=name, declared=sorted(self)))
        self[name] += float(value)


def reduce_by_name(sums: Mapping[str, float], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """`sums` added over all ranks, name by name (one all-reduce of the values in sorted-name order)."""
    names = sorted(sums)
    if not names:
        return {}
    values = torch.tensor([float(sums[n]) for n in names], dtype=torch.float64, device=device)
    return dict(zip(names, all_reduce_sum(values).cpu().tolist(), strict=True))


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
