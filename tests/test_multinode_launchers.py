"""Multi-node, round two, on the two-node cluster of namespaces (`.ci/slurm-two-node.sh`, with an sshd per node).

Proven here:
- DeepSpeed's own multi-node launcher outside Slurm: `deepspeed --hostfile` started on the first node
  reaches both nodes over pdsh/ssh and trains like a 2-rank single-host run bit for bit; SIGTERM to that
  launcher reaches every remote rank (each saves the same step and exits 75, as its log says), and the same
  command with `--auto-resume` continues from that checkpoint to the same losses and weights.
- 2 nodes x 2 ranks (world 4, `tiny-moe`): under srun (expert-parallel size 2) and under the hostfile
  launcher (size 4) every rank knows its global and its node-local rank, the data are pre-tokenized once
  by the global main rank into the shared `--data-dir` and reused by the second run, every rank writes its
  part of each checkpoint into the shared run directory, and the experts are placed as documented.
- Losing the node that runs the batch script (the allocation's first node): Slurm requeues the job,
  which resumes from the last complete checkpoint and ends with the reference losses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from ports import free_port
from slurm_cluster import (  # noqa: F401  (two_node_cluster is a fixture)
    ROOT,
    job_info,
    on_node,
    submit,
    tail,
    train_records,
    two_node_action,
    two_node_cluster,
    wait_for_job,
    wait_for_step,
)

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

MAX_STEPS = 20
SAVE_EVERY = 5
STOP_AT = 3
LOSE_NODE_AT = 12
DIST_TIMEOUT = 10
"""Seconds a rank waits in a collective in the lost-node run: under SlurmdTimeout (30 s)."""
TRAIN_ARGS = ("--config", "tiny", "--ds-config", "ds_configs/zero1.json", "--max-steps", str(MAX_STEPS),
              "--batch-size", "2", "--seq-len", "64", "--eval-interval", "0", "--save-interval", str(SAVE_EVERY),
              "--warmup-steps", "5", "--log-interval", "10")
PATIENT = ("--dist-timeout", "300")
"""Runs that lose no node wait for slow peers (a loaded machine starts ranks seconds apart)."""
MOE_STEPS = 4
MOE_ARGS = ("--config", "tiny-moe", "--ds-config", "ds_configs/zero1.json", "--max-steps", str(MOE_STEPS),
            "--batch-size", "2", "--seq-len", "32", "--eval-interval", "0", "--save-interval", "2",
            "--warmup-steps", "1", "--log-interval", "2", *PATIENT)
RANK_LINE = re.compile(r"\[minigpt\] rank (\d+)/(\d+) on host (\S+) \(local rank (\d+)[^)]*\)"
                       r"(?:, experts (\d+)-(\d+) of each MoE layer \(expert-parallel size (\d+)\))?")
PRETOKENIZING = "[minigpt] pre-tokenizing"


def placement(text: str) -> dict[int, tuple[str, int]]:
    """Global rank -> (host, local rank), from every rank's start line."""
    return {int(m[0]): (m[2], int(m[3])) for m in RANK_LINE.findall(text)}


def experts(text: str) -> dict[int, tuple[int, int, int]]:
    """Global rank -> (first expert, last expert, expert-parallel size)."""
    return {int(m[0]): (int(m[4]), int(m[5]), int(m[6])) for m in RANK_LINE.findall(text) if m[4]}


def loss_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final" / "model.pt", weights_only=True)


def rank_processes(out: Path) -> list[psutil.Process]:
    """The `launch/train.py` processes of the run directory `out`, on any node (one machine here)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(arg.endswith("launch/train.py") for arg in cmdline) and str(out) in cmdline:
            found.append(proc)
    return found


def wait_until_no_rank_runs(out: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not rank_processes(out):
            return
        time.sleep(0.5)
    pytest.fail(f"ranks of {out} still running {timeout:.0f} s after the launcher was stopped")


def write_hostfile(path: Path, nodes: tuple[str, ...], slots: int) -> Path:
    path.write_text("".join(f"{node} slots={slots}\n" for node in nodes))
    return path


class HostfileLaunch:
    """`deepspeed --hostfile` started on the first node, as a user would on a cluster's login/head node.

    The environment reaches the remote ranks through a `.deepspeed_env` file (DS_ENV_FILE names it), the
    one way the launcher passes variables over pdsh besides PYTHON*/UCX*/MV2*/MLFLOW* ones. PATH goes
    there too: an ssh session's default PATH finds another `ninja` than the virtual environment's, and
    DeepSpeed's CPU extension (deepspeed_shm_comm, built at first use) is then rebuilt at every switch."""

    def __init__(self, base: Path, name: str, nodes: tuple[str, ...], slots: int, args: tuple[str, ...]) -> None:
        self.out = base / name
        self.rank_logs = base / f"{name}-rank-logs"
        self.hostfile = write_hostfile(base / f"{name}.hostfile", nodes, slots)
        self.env_file = base / f"{name}.deepspeed_env"
        self.env_file.write_text(f"OMP_NUM_THREADS=1\nPATH={os.environ['PATH']}\n")
        self.nodes, self.args, self.port, self.runs = nodes, args, free_port(), 0

    def start(self) -> subprocess.Popen:
        self.runs += 1
        cmd = on_node(self.nodes[0], "deepspeed", "--hostfile", str(self.hostfile), "--master_addr", self.nodes[0],
                      "--master_port", str(self.port), "--enable_each_rank_log", str(self.rank_logs / str(self.runs)),
                      "launch/train.py", "--out", str(self.out), "--auto-resume", *self.args)
        env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        env["DS_ENV_FILE"] = str(self.env_file)
        self.log = self.out.parent / f"{self.out.name}.launcher-{self.runs}.log"
        self.out.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)

    def rank_log_text(self, run: int) -> dict[int, str]:
        """Rank -> that rank's own log of launch number `run` (`--enable_each_rank_log`)."""
        logs = {}
        for path in (self.rank_logs / str(run)).glob("*_rank*.log"):
            logs[int(re.search(r"_rank(\d+)\.log$", path.name).group(1))] = path.read_text(errors="replace")
        return logs

    def text(self) -> str:
        """The launcher's own output, then every rank's log of the latest launch."""
        ranks = self.rank_log_text(self.runs)
        return "\n".join([self.log.read_text(errors="replace"), *(ranks[rank] for rank in sorted(ranks))])


@pytest.fixture(scope="module")
def base(two_node_cluster: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
         ) -> Iterator[dict]:
    """One tokenizer for every run, and the 2-rank single-host reference (started, not awaited)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        base = tmp_path_factory.mktemp("multinode")
        prep = subprocess.run([sys.executable, "launch/train.py", "--out", str(base / "prep"), "--max-steps", "1",
                               "--eval-interval", "0", "--device", "cpu", "--data-dir", str(base / "prep-data")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert prep.returncode == 0, prep.stderr[-3000:]
        tokenizer = base / "prep" / "tokenizer"
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
               "--out", str(base / "single_node"), "--tokenizer", str(tokenizer), *TRAIN_ARGS, *PATIENT]
        env_vars = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        log = base / "single_node.log"  # a file, not a pipe: nobody reads it until the run is over
        with log.open("w") as out:
            reference = subprocess.Popen(cmd, cwd=ROOT, env=env_vars, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            yield {"base": base, "tokenizer": tokenizer, "reference": reference, "single_node": base / "single_node",
                   "reference_log": log}
        finally:
            reference.kill()


def reference_losses(base: dict) -> dict[int, float]:
    reference = base["reference"]
    if reference.returncode is None:
        reference.wait(timeout=600)
    assert reference.returncode == 0, f"single-node reference failed:\n{tail(base['reference_log'])}"
    return loss_by_step(base["single_node"])


def wait_for_requeue(job_id: str, timeout: float, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if job_info(job_id).restarts >= 1:
            return time.monotonic() - started
        time.sleep(1)
    pytest.fail(f"job {job_id} not requeued {timeout:.0f} s after losing its batch node; log:\n{tail(log)}")


def test_losing_the_batch_node_requeues_and_resumes_from_the_last_complete_checkpoint(
        base, two_node_cluster, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "lost_batch_node"
    job_id = submit("--nodes", "2", "--cpu-ranks-per-node", "1", "--time", "10", "--job-name", "mg2-lost-batch",
                    "--out", str(out), "--", *TRAIN_ARGS, "--dist-timeout", str(DIST_TIMEOUT),
                    "--tokenizer", str(base["tokenizer"]))
    log = out / f"slurm-{job_id}.out"
    batch_node = two_node_cluster[0]  # the allocation's first node runs the batch script and rank 0
    try:
        wait_for_step(out, LOSE_NODE_AT, timeout=300, log=log)
        assert job_info(job_id).state == "RUNNING"
        two_node_action("kill-node", batch_node)
        requeued_after = wait_for_requeue(job_id, timeout=150, log=log)
        two_node_action("revive-node", batch_node)
        info = wait_for_job(job_id, timeout=300, log=log)
    finally:
        subprocess.run(["scancel", job_id], check=False)
        two_node_action("revive-node", batch_node)
    text = log.read_text(errors="replace")
    assert info.state == "COMPLETED", f"job {info.state}:\n{tail(log)}"
    assert info.restarts == 1, tail(log)
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed, f"the requeued run did not resume; log:\n{tail(log)}"
    resumed_at = int(resumed.group(1))
    assert resumed_at >= SAVE_EVERY and resumed_at % SAVE_EVERY == 0, f"resumed at step {resumed_at}"
    assert sorted(loss_by_step(out)) == list(range(MAX_STEPS)), "steps were lost"
    assert loss_by_step(out) == reference_losses(base), "the resumed losses differ from the reference"
    print(f"batch node lost at step >= {LOSE_NODE_AT}; requeued after {requeued_after:.0f} s; resumed at {resumed_at}")


def test_hostfile_launcher_over_ssh_stops_every_remote_rank_on_sigterm_and_resumes_bitwise(
        base, two_node_cluster) -> None:  # noqa: F811
    nodes = two_node_cluster
    # DeepSpeed's runner stops remote ranks with `pdsh -w <hosts> pkill -f "python -u -m deepspeed.launcher.launch"`,
    # which stops every DeepSpeed launch on those hosts; here the hosts share one process table, so the
    # reference (another DeepSpeed launch on this machine) must be done first.
    reference = reference_losses(base)
    launch = HostfileLaunch(base["base"], "hostfile", nodes, 1, (*TRAIN_ARGS, *PATIENT, "--keep-last", str(MAX_STEPS),
                                                                 "--tokenizer", str(base["tokenizer"])))
    runner = launch.start()
    try:
        wait_for_step(launch.out, STOP_AT, timeout=300, log=launch.log)
        runner.send_signal(signal.SIGTERM)  # the runner alone, as `kill`, `timeout` or a scheduler would
        runner_rc = runner.wait(timeout=90)
        wait_until_no_rank_runs(launch.out, timeout=60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    text = launch.text()
    assert "cmd = pdsh" in text and "export OMP_NUM_THREADS=1;" in text, f"not launched over pdsh:\n{text[-3000:]}"
    assert placement(text) == {0: (nodes[0], 0), 1: (nodes[1], 0)}, text[-3000:]
    # DeepSpeed's runner ends 1 after its SIGTERM handler ran `pdsh ... pkill -f deepspeed.launcher.launch`;
    # each node's launcher then SIGTERMs its ranks, which save and exit 75.
    assert runner_rc == 1, text[-3000:]
    rank_logs = launch.rank_log_text(1)
    assert sorted(rank_logs) == [0, 1], sorted(rank_logs)
    for rank, log in rank_logs.items():
        assert "SIGTERM received: saving a checkpoint" in log and f"rank {rank} stopped; exiting with code 75" in log, (
            f"rank {rank} did not stop on SIGTERM with code 75:\n{log[-2000:]}")
    stop_dir = launch.out / "ckpt" / (launch.out / "latest").read_text().strip()
    stop_step = json.loads((stop_dir / "trainer_state.json").read_text())["step"]
    assert STOP_AT <= stop_step < MAX_STEPS, stop_step
    assert f"stopped at step {stop_step} (SIGTERM); checkpoint saved" in rank_logs[0]
    for rank in (0, 1):  # rank 1 ran on the second node: its optimizer partition and RNG state are here
        assert (stop_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), sorted(stop_dir.iterdir())
        assert (stop_dir / f"rng_rank{rank}.json").is_file(), sorted(stop_dir.iterdir())

    # The same command again: --auto-resume continues from that checkpoint, across both nodes.
    resumed = launch.start()
    try:
        rc = resumed.wait(timeout=400)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    text = launch.text()
    assert rc == 0, text[-3000:]
    assert f"at step {stop_step}" in text and "resumed from" in text, text[-3000:]
    assert sorted(loss_by_step(launch.out)) == list(range(MAX_STEPS))
    assert loss_by_step(launch.out) == reference, "the hostfile run's losses differ from one host's"
    ours, theirs = final_weights(launch.out), final_weights(base["single_node"])
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), "final weights differ"


def assert_four_ranks_two_per_node(text: str, nodes: tuple[str, ...], ep_size: int) -> None:
    assert placement(text) == {0: (nodes[0], 0), 1: (nodes[0], 1), 2: (nodes[1], 0), 3: (nodes[1], 1)}, (
        f"ranks were placed {placement(text)}:\n{text[-3000:]}")
    per_rank = 4 // ep_size  # tiny-moe: 4 experts; rank r holds experts (r mod ep) * 4/ep ...
    assert experts(text) == {r: ((r % ep_size) * per_rank, (r % ep_size) * per_rank + per_rank - 1, ep_size)
                             for r in range(4)}, experts(text)


def assert_every_rank_wrote_its_part(out: Path) -> None:
    for step_dir in sorted((out / "ckpt").glob("step_*")):
        names = {p.name for p in step_dir.iterdir()}
        for rank in range(4):  # ranks 2 and 3 ran on the second node
            assert f"rng_rank{rank}.json" in names, (step_dir, sorted(names))
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names, (step_dir, sorted(names))
        experts_saved = {int(m.group(1)) for n in names if (m := re.search(r"_expert_(\d+)_mp_rank", n))}
        assert experts_saved == {0, 1, 2, 3}, sorted(names)
    assert (out / "final" / "model.pt").is_file()


def test_two_nodes_two_ranks_each_under_srun_and_hostfile_with_experts_across_nodes(
        base, two_node_cluster, tmp_path: Path) -> None:  # noqa: F811
    nodes = two_node_cluster
    data_dir = tmp_path / "shared-data"
    common = (*MOE_ARGS, "--tokenizer", str(base["tokenizer"]), "--data-dir", str(data_dir))
    out = tmp_path / "srun-ep2"
    job_id = submit("--nodes", "2", "--cpu-ranks-per-node", "2", "--time", "10", "--job-name", "mg4-srun",
                    "--out", str(out), "--", *common, "--ep-size", "2")
    job_log = out / f"slurm-{job_id}.out"
    launch = HostfileLaunch(tmp_path, "hostfile-ep4", nodes, 2, (*common, "--ep-size", "4"))
    runner = None
    try:
        # Data preparation ends before the engine starts (each rank prints its place then): from here on
        # the second run finds the shards ready.
        deadline = time.time() + 300
        while len(placement(tail(job_log, 400))) < 4:
            assert time.time() < deadline, f"the srun job did not start its 4 ranks:\n{tail(job_log)}"
            assert job_info(job_id).state in {"PENDING", "RUNNING", "CONFIGURING"}, tail(job_log)
            time.sleep(1)
        runner = launch.start()
        rc = runner.wait(timeout=500)
        info = wait_for_job(job_id, timeout=300, log=job_log)
    finally:
        subprocess.run(["scancel", job_id], check=False)
        if runner is not None and runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    srun_text, hostfile_text = job_log.read_text(errors="replace"), launch.text()
    assert info.state == "COMPLETED", f"srun job {info.state}:\n{tail(job_log)}"
    assert rc == 0, hostfile_text[-3000:]
    assert_four_ranks_two_per_node(srun_text, nodes, ep_size=2)
    assert_four_ranks_two_per_node(hostfile_text, nodes, ep_size=4)
    # Built once, by the global main rank (rank 0 on the first node) — not once per node — then reused.
    assert srun_text.count(PRETOKENIZING) == 1, srun_text[-3000:]
    assert PRETOKENIZING not in hostfile_text, "the second run built the shards again"
    built = sorted((data_dir / "cache").glob("pretrain-*"))  # beside it: the built-in corpus file (`demo/`)
    assert len(built) == 1 and (built[0] / "train" / "meta.json").is_file(), sorted((data_dir / "cache").iterdir())
    for run_dir in (out, launch.out):
        assert sorted(loss_by_step(run_dir)) == list(range(MOE_STEPS))
        assert_every_rank_wrote_its_part(run_dir)
