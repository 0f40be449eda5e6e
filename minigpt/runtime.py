"""The distributed runtime: who this process is (rank, world size, local rank, device) and the few
collectives the project needs (barrier, sum all-reduce, any-rank flag).

`minigpt.engine.create_runtime` makes it first, before data resolution, the model or an engine: under
a distributed launcher (deepspeed, torchrun, srun) it starts the process group — the single place where
that happens is `minigpt.engine.deepspeed.init_distributed` (gloo on CPU; its timeout is set there) — so
everything after it can use a barrier instead of polling the filesystem. One process without a
launcher gets a world of one. This module imports nothing of the project but `minigpt.i18n` (which imports
nothing of it), so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from minigpt.i18n import _

MESSAGE_BYTES = 2048
"""How much of a failing rank's message the other ranks are told."""


class RankFailed(RuntimeError):
    """Raised on every other rank when one rank's part of a shared step failed: says which rank and why."""


@dataclass
class Runtime:
    """This process's place in the run, and collectives that are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    """True when a process group exists (every DeepSpeed run, even a world of one)."""
    deepspeed_plan: Any = None
    """The `minigpt.engine.ds_config.DeepSpeedPlan` checked before the process group started (DeepSpeed runs)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. the main rank has finished building the tokenizer)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over all ranks (a new tensor; the input is left alone)."""
        if self.world_size > 1:
            values = values.clone()
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is set on any rank (used to agree on stopping at a step boundary)."""
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)


    def share_text(self, text: str | None, owner: int = 0, limit: int = MESSAGE_BYTES) -> str | None:
        """`text` as the rank `owner` holds it, on every rank (all ranks call this; the others pass None).
        Longer than `limit` UTF-8 bytes, it is cut there."""
        if self.world_size == 1:
            return text
        payload = torch.zeros(1 + limit, dtype=torch.int32, device=self.device)
        if self.rank == owner and text is not None:
            encoded = text.encode("utf-8")[:limit]
            payload[0] = 1
            payload[1:1 + len(encoded)] = torch.tensor(list(encoded), dtype=torch.int32)
        payload = self.all_reduce_sum(payload).cpu()
        if not int(payload[0]):
            return None
        return bytes(payload[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="ignore")

    def agree_on_failure(self, error: BaseException | None, doing: str) -> None:
        """After a step some ranks did alone (the main rank choosing a checkpoint, each rank writing its
        files), every rank calls this: when no rank failed it returns; otherwise the failing rank raises its
        own `error` and every other rank a `RankFailed` with the first failing rank's message, so no rank is
        left waiting in a collective the others never reach."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(error is not None)
        failed = self.all_reduce_sum(flags).cpu().nonzero().flatten().tolist()
        if not failed:
            return
        first = failed[0]
        mine = (str(error) or type(error).__name__) if self.rank == first else None
        message = self.share_text(mine, first)
        if error is not None:
            raise error
        who = _("the main rank") if first == 0 else _("rank {rank}").format(rank=first)
        raise RankFailed(_("{who} stopped while {doing}: {message}").format(who=who, doing=doing, message=message))

    def main_rank_does(self, work: Callable[[], Any], doing: str) -> Any:
        """`work()` on the main rank alone (its result there, None elsewhere); every rank learns whether it
        failed and why (`agree_on_failure`)."""
        return self.every_rank_does(work if self.is_main else lambda: None, doing)

    def every_rank_does(self, work: Callable[[], Any], doing: str) -> Any:
        """`work()` on every rank; all stop together if it fails on any (`agree_on_failure`)."""
        result, error = None, None
        try:
            result = work()
        except Exception as err:
            error = err
        self.agree_on_failure(error, doing)
        return result
