"""The project's sbatch scripts on a real one-node Slurm cluster: a job finishes; a preempted job
checkpoints, requeues itself, resumes and ends with the same loss as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    ROOT,
    slurm_cluster,
    submit,
    tail,
    train_records,
    wait_for_job,
    wait_for_step,
)

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

MAX_STEPS = 30
STOP_AT = 6
# Two DeepSpeed ranks (ZeRO-1: sharded optimizer state to save and restore) on CPU, launched by srun
# (the scripts' default launcher); tiny model, small batches.
JOB_ARGS = ("--cpu-ranks-per-node", "2", "--time", "10", "--preset", "tiny", "--ds-config", "ds_configs/zero1.json")
TRAIN_ARGS = ("--max-steps", str(MAX_STEPS), "--batch-size", "2", "--seq-len", "64", "--eval-interval", "0",
              "--save-interval", "0", "--warmup-steps", "5", "--log-interval", "5")


@dataclass
class Job:
    job_id: str
    out: Path

    @property
    def log(self) -> Path:
        return self.out / f"slurm-{self.job_id}.out"


def loss_curve(run_dir: Path) -> dict[int, float]:
    """Train loss by step from `<run_dir>/metrics.jsonl`; fails if a step was logged twice."""
    records = train_records(run_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{run_dir}: a step was trained twice (the stop checkpoint was stale)"
    assert len(steps) == MAX_STEPS and steps == list(range(steps[0], steps[0] + MAX_STEPS)), (
        f"{run_dir}: expected {MAX_STEPS} consecutive steps, got {steps}")
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def jobs(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:  # noqa: F811
    """Two identical jobs side by side; the second gets the preemption signal after a few steps."""
    base = tmp_path_factory.mktemp("slurm")
    # Both runs must see the same tokens; a tokenizer trained per run is not reproducible, so train one.
    prep = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--out", str(base / "prep"),
                           "--max-steps", "1", "--eval-interval", "0", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    train_args = (*TRAIN_ARGS, "--tokenizer", str(base / "prep" / "tokenizer"))
    submitted = {}
    for name in ("reference", "preempted"):
        out = base / name
        submitted[name] = Job(submit(*JOB_ARGS, "--job-name", f"minigpt-{name}", "--out", str(out), "--",
                                     *train_args), out)
    preempted = submitted["preempted"]
    try:
        wait_for_step(preempted.out, STOP_AT, timeout=300, log=preempted.log)
        # What --signal=B:USR1@<lead> does before the time limit: SIGUSR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", preempted.job_id], check=True)
        yield submitted
    finally:
        subprocess.run(["scancel", *(job.job_id for job in submitted.values())], check=False)


def test_pretrain_job_finishes_with_checkpoint_and_consolidated_weights(jobs: dict[str, Job]) -> None:
    job = jobs["reference"]
    info = wait_for_job(job.job_id, timeout=600, log=job.log)
    assert info.state == "COMPLETED", f"job {job.job_id} ended {info.state} ({info.exit_code}); log:\n{tail(job.log)}"
    assert info.restarts == 0, "a finished job must not requeue itself"
    assert (job.out / "final" / "model.pt").is_file()
    assert (job.out / "latest").exists()
    assert (job.out / "ckpt" / f"step_{MAX_STEPS:07d}").is_dir(), sorted(p.name for p in (job.out / "ckpt").iterdir())
    assert "training finished (exit 0); not requeueing" in job.log.read_text(errors="replace")


def test_signalled_job_checkpoints_requeues_resumes_and_matches_uninterrupted_loss(jobs: dict[str, Job]) -> None:
    job = jobs["preempted"]
    info = wait_for_job(job.job_id, timeout=600, log=job.log)
    text = job.log.read_text(errors="replace")
    assert info.state == "COMPLETED", f"job {job.job_id} ended {info.state} ({info.exit_code}); log:\n{tail(job.log)}"
    assert info.restarts == 1, f"expected exactly one requeue; log:\n{tail(job.log)}"
    assert "received SIGUSR1" in text and "requeueing job" in text
    assert "resumed from" in text, f"the requeued run did not resume; log:\n{tail(job.log)}"
    assert (job.out / "final" / "model.pt").is_file()

    reference = jobs["reference"]
    assert wait_for_job(reference.job_id, timeout=600, log=reference.log).state == "COMPLETED"
    resumed, uninterrupted = loss_curve(job.out), loss_curve(reference.out)
    last = max(uninterrupted)
    assert resumed[last] == uninterrupted[last], "final loss differs from the uninterrupted run's"
    assert resumed == uninterrupted, "the loss curves differ somewhere before the last step"


def test_job_hitting_its_time_limit_checkpoints_requeues_and_finishes(jobs: dict[str, Job],
                                                                     tmp_path: Path) -> None:
    """The real preemption path: a 1-minute limit, `--signal=B:USR1@40`, Slurm's own signal."""
    out = tmp_path / "timelimit"
    steps = 150  # more than one run of the job can train before its signal, even on a quiet machine
    job = Job(submit("--cpu-ranks-per-node", "1", "--launcher", "python", "--time", "1", "--signal-lead", "40",
                     "--preset", "tiny", "--job-name", "minigpt-timelimit", "--out", str(out), "--",
                     "--max-steps", str(steps), "--batch-size", "16", "--seq-len", "128", "--eval-interval", "0",
                     "--save-interval", "0", "--log-interval", "50",
                     "--tokenizer", str(jobs["reference"].out.parent / "prep" / "tokenizer")), out)
    try:
        info = wait_for_job(job.job_id, timeout=900, log=job.log)
    finally:
        subprocess.run(["scancel", job.job_id], check=False)
    text = job.log.read_text(errors="replace")
    assert info.state == "COMPLETED", f"job {job.job_id} ended {info.state}; log:\n{tail(job.log)}"
    assert info.restarts >= 1 and "received SIGUSR1" in text and "resumed from" in text, tail(job.log)
    steps_logged = [r["step"] for r in train_records(out)]
    assert steps_logged == list(range(steps)), "steps were lost or trained twice across the requeues"
    assert (out / "final" / "model.pt").is_file()
