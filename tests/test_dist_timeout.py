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
