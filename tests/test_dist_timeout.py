"""`--dist-timeout` bounds a collective whose peer never comes, also on groups made after the world group
(DeepSpeed runs ZeRO's reductions on its own clone of the world, which torch would give a 30 min default).

Two real processes over gloo on this machine; rank 1 never joins the all-reduce, as a lost node would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from minigpt.engine.deepspeed import init_distributed
    init_distributed(timeout_s=3)
    group = torch.distributed.new_group(ranks=[0, 1])  # made after init, like DeepSpeed's data-parallel group
    if torch.distributed.get_rank() == 1:
        time.sleep(60)  # never joins: the peer of a lost node
        sys.exit(0)
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(4), group=group)
    except RuntimeError as err:
        print(f"failed after {time.monotonic() - started:.1f} s: {err}", flush=True)
        os._exit(3)  # a normal exit tears down the group with the timed-out work pending: gloo aborts
    os._exit(0)
""")


def test_collective_on_a_later_group_fails_after_the_dist_timeout_instead_of_hanging() -> None:
    pytest.importorskip("deepspeed", reason="init_distributed is the DeepSpeed engine's")
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        output = ranks[0].communicate(timeout=120)[0]
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 3, output[-3000:]
    waited = float(output.split("failed after ")[1].split(" s")[0])
    assert 2.5 <= waited < 30, f"the all-reduce gave up after {waited} s, not after the 3 s timeout"
    assert "Timed out" in output, output[-3000:]


SHM_SCRIPT = textwrap.dedent("""
    import sys, torch, deepspeed
    from pathlib import Path
    from minigpt.engine.deepspeed import init_distributed
    init_distributed(timeout_s=60)
    rank = torch.distributed.get_rank()
    # DeepSpeed's shared-memory all-reduce still works on the mapped segments after their names are gone.
    summed = deepspeed.comm.inference_all_reduce(torch.full((8,), float(rank + 1)))
    torch.distributed.barrier()
    Path(sys.argv[-1], f"rank{rank}.txt").write_text(str(summed.tolist()))
""")


def test_a_launch_leaves_no_shared_memory_segments_behind(tmp_path) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MiB /dev/shm segment per rank and never removes it: each 2-rank
    run on a new port used to keep 132 MiB of RAM until reboot, which filled a CI machine's memory."""
    pytest.importorskip("deepspeed", reason="the segments are DeepSpeed's")
    script = tmp_path / "shm_ranks.py"
    script.write_text(SHM_SCRIPT)
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", port, str(script), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == str([3.0] * 8), output[-3000:]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == [], f"segments left in /dev/shm: {left}"
