"""What every evaluation task runs with: the model, its tokenizer, the ranks and how work is shared.

Work is cut into *global batches* (the same batches whatever the world size); batch k belongs to rank
k mod world. Each rank adds its batches' results into named sums that are all-reduced, so one rank
and many compute every batch identically and report the same numbers. With `lockstep` (inside a
ZeRO-3 training run, where every forward pass is collective) every rank also runs the same number of
forward passes: a rank short of a batch repeats one and discards it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from minigpt.data import records
from minigpt.data.records import RecordError
from minigpt.metrics import MetricSums, reduce_by_name
from minigpt.runtime import Runtime


class EvalDataError(ValueError):
    """An evaluation file that cannot be used: missing, malformed, or a record without a needed field."""


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a UTF-8 JSONL file (`records.jsonl_objects`);
    EvalDataError names the file, line and field of a line that cannot be used."""
    try:
        yield from records.jsonl_objects(path)
    except RecordError as err:
        raise EvalDataError(str(err)) from None


@dataclass
class EvalContext:
    """The model under evaluation (eval mode, on `runtime.device`) and how its work is shared."""

    model: torch.nn.Module
    tokenizer: object
    runtime: Runtime = field(default_factory=Runtime)
    batch_size: int = 8
    lockstep: bool = False
    progress: bool = True
    exclude: frozenset[str] = frozenset()
    """Prompts of training files: evaluation items with one of these prompts are left out (and counted)."""

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    def owns(self, batch_index: int) -> bool:
        """True when global batch `batch_index` is this rank's to compute."""
        return batch_index % self.runtime.world_size == self.runtime.rank

    def owed_batches(self, total_batches: int, computed: int) -> int:
        """Forward passes this rank must still run (and discard) to match the busiest rank in lockstep."""
        if not self.lockstep or total_batches == 0:
            return 0
        return math.ceil(total_batches / self.runtime.world_size) - computed

    def reduce(self, sums: MetricSums) -> dict[str, float]:
        return reduce_by_name(sums, self.runtime.all_reduce_sum, self.device)

    def bar(self, description: str, total: int | None, unit: str) -> tqdm:
        """A progress bar on the main rank (disabled elsewhere and with progress off)."""
        return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "tok", leave=False,
                    dynamic_ncols=True, disable=not (self.progress and self.runtime.is_main))


def global_batches(items: list, batch_size: int) -> Iterable[tuple[int, list]]:
    """(index, items) of consecutive batches of `batch_size` items."""
    for index, start in enumerate(range(0, len(items), batch_size)):
        yield index, items[start:start + batch_size]
