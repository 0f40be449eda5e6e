"""`Runtime.agree_on_failure` on two real gloo ranks: when one rank fails a step the others did not, every
rank stops at once, the failing one with its own error and the others with its rank and message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from minigpt.runtime import RankFailed, Runtime

pytestmark = pytest.mark.integration
WORLD = 2


def _rank_main(rank: int, init_file: str, results: str, failing: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    runtime = Runtime(rank=rank, world_size=WORLD, distributed=True)
    error = OSError(28, f"No space left on device: rank {rank}'s file") if rank == failing else None
    try:
        runtime.agree_on_failure(error, "writing ckpt/step_0000010.tmp")
        outcome = {"raised": None}
    except (RankFailed, OSError) as err:
        outcome = {"raised": type(err).__name__, "message": str(err)}
    outcome["shared"] = runtime.share_text("step_0000010" if rank == 0 else None)
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, failing: int | None) -> list[dict]:
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), str(tmp_path), failing), nprocs=WORLD,
                       start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("failing", [0, 1])
def test_one_rank_failing_stops_every_rank_with_its_reason(tmp_path, failing):
    outcomes = run_ranks(tmp_path, failing)
    other = 1 - failing
    assert outcomes[failing]["raised"] == "OSError"
    who = "the main rank" if failing == 0 else "rank 1"
    assert outcomes[other] == {"raised": "RankFailed", "shared": "step_0000010",
                               "message": f"{who} stopped while writing ckpt/step_0000010.tmp: [Errno 28] "
                                          f"No space left on device: rank {failing}'s file"}


def test_when_no_rank_fails_every_rank_goes_on_and_shares_the_main_ranks_text(tmp_path):
    assert run_ranks(tmp_path, None) == [{"raised": None, "shared": "step_0000010"}] * WORLD
