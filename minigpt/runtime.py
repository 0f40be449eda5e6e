"""The distributed runtime: who this process is (rank, world size, local rank, device) and the few
collectives the project needs (barrier, sum all-reduce, any-rank flag).

`minigpt.engine.create_runtime` makes it first, before data resolution, the model or an engine: under
a distributed launcher (deepspeed, torchrun, srun) it starts the process group — the single place where
that happens is `minigpt.engine.deepspeed.init_distributed` (gloo on CPU; its timeout is set there) — so
everything after it can use a barrier instead of polling the filesystem. One process without a
launcher gets a world of one. This module imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Runtime:
    """This process's place in the run, and collectives that are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    """True when a process group exists (every DeepSpeed run, even a world of one)."""

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

