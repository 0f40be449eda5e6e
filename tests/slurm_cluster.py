"""Real Slurm clusters for the integration tests, and helpers to submit and watch jobs.

`slurm_cluster` (session fixture) runs `.ci/slurm-setup.sh start` (installs slurm-wlm + munge when
missing, starts munged, slurmctld, slurmd) and stops the daemons at the end if it started them. It
skips, with the reason, only when this is not root or the packages cannot be installed.

`two_node_cluster` (module fixture) runs `.ci/slurm-two-node.sh start` (two nodes, each a network +
UTS namespace of this machine, each with an sshd for DeepSpeed's hostfile launcher) and points the Slurm
clients at it through SLURM_CONF; it skips with the script's reason where namespaces cannot be made or
the packages (slurm-wlm, munge, openssh-server, pdsh) cannot be installed, and tears everything down
afterwards. `on_node` runs a command as if on one of the nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "slurm-setup.sh"
TWO_NODE_SETUP = ROOT / ".ci" / "slurm-two-node.sh"
TWO_NODE_CONF = "/etc/slurm-minigpt-2node/slurm.conf"
TWO_NODE_NAMES = ("mgn1", "mgn2")
TWO_NODE_RUN_DIR = "/run/minigpt-slurm-2node"
SUBMIT = ROOT / "slurm" / "submit.sh"
EXIT_UNAVAILABLE = 3
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Start the one-node cluster (or reuse a running one); yields the node name."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root to install and start slurm-wlm/munge")
    already_running = subprocess.run(["bash", str(SETUP), "status"], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(SETUP), "start"], capture_output=True, text=True, timeout=900)
    if result.returncode == EXIT_UNAVAILABLE:
        pytest.skip(f"no Slurm cluster possible here: {result.stderr.strip()}")
    assert result.returncode == 0, f".ci/slurm-setup.sh start failed:\n{result.stderr}"
    yield os.uname().nodename.split(".")[0]
    if not already_running:
        subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[tuple[str, ...]]:
    """Start the two-node cluster (or reuse a running one); yields the node names.

    Slurm clients run by the tests (and the jobs, which inherit the environment) talk to it through
    SLURM_CONF. Torn down afterwards, failed tests included, unless it was running before."""
    if os.geteuid() != 0:
        pytest.skip("the two-node Slurm cluster needs root (network namespaces, slurmd)")
    already_running = subprocess.run(["bash", str(TWO_NODE_SETUP), "status"], capture_output=True).returncode == 0
    try:
        result = subprocess.run(["bash", str(TWO_NODE_SETUP), "start"], capture_output=True, text=True,
                                timeout=900)
        if result.returncode == EXIT_UNAVAILABLE:
            pytest.skip(f"no two-node Slurm cluster possible here: {result.stderr.strip()}")
        assert result.returncode == 0, f".ci/slurm-two-node.sh start failed:\n{result.stderr}"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SLURM_CONF", TWO_NODE_CONF)
            yield TWO_NODE_NAMES
    finally:
        if not already_running:
            subprocess.run(["bash", str(TWO_NODE_SETUP), "stop"], capture_output=True, text=True, timeout=120)


def on_node(node: str, *cmd: str) -> list[str]:
    """`cmd` run as if on `node`: in its network and UTS namespaces (its address, its host name), as the
    node's slurmd and sshd run; the filesystem is this machine's, i.e. shared by the nodes."""
    return ["nsenter", f"--net=/run/netns/{node}", f"--uts={TWO_NODE_RUN_DIR}/uts/{node}", *cmd]


def two_node_action(action: str, node: str) -> None:
    """`.ci/slurm-two-node.sh kill-node|revive-node NODE`."""
    result = subprocess.run(["bash", str(TWO_NODE_SETUP), action, node], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{action} {node} failed:\n{result.stderr}"


@dataclass
class JobInfo:
    """What `scontrol show job` says about a job."""

    job_id: str
    state: str
    restarts: int
    exit_code: str


def submit(*args: str) -> str:
    """Run slurm/submit.sh with `args`; returns the job id (its last output line)."""
    result = subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"submit.sh failed:\n{result.stdout}\n{result.stderr}"
    job_id = result.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), result.stdout
    return job_id


def job_info(job_id: str) -> JobInfo:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    return JobInfo(job_id, fields["JobState"], int(fields.get("Restarts", "0")), fields.get("ExitCode", ""))


def wait_for_job(job_id: str, timeout: float, log: Path) -> JobInfo:
    """Poll until the job reaches a final state; fail with the job log's tail on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info.state in FINAL_STATES:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s (state {info.state}); log:\n{tail(log)}")


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "<no log>"


def train_records(run_dir: Path) -> list[dict]:
    """Per-step training records of `<run_dir>/metrics.jsonl` (evaluation records left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split", "train") == "train" and "loss" in r and "step" in r]


def wait_for_step(run_dir: Path, step: int, timeout: float, log: Path) -> None:
    """Wait until training in `run_dir` logged at least `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = train_records(run_dir)
        if records and records[-1]["step"] >= step:
            return
        time.sleep(0.5)
    pytest.fail(f"{run_dir} did not reach step {step} in {timeout:.0f} s; log:\n{tail(log)}")
