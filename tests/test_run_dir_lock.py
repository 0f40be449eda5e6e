"""One process per run directory: a second process is refused by name, a live `step_N.tmp` is never
swept, and a dead holder never leaves a stale lock. Every case uses real, separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt.train.run_dir import LOCK_FILE, RunDirBusy, lock_run_dir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = ("import sys, time; from pathlib import Path; from minigpt.train.run_dir import lock_run_dir; "
        "lock = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes `run_dir`'s lock and keeps it until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_by_name_until_the_first_ends(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        busy = rf"{run_dir}: another process \(pid {holder.pid} on .*\) is training"
        with pytest.raises(RunDirBusy, match=busy):
            lock_run_dir(run_dir)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    lock_run_dir(run_dir).release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    holder.stdin.close()
    lock = lock_run_dir(run_dir)
    assert f"pid {os.getpid()}" in (run_dir / LOCK_FILE).read_text()
    lock.release()


@pytest.mark.integration
@pytest.mark.parametrize("resume", [[], ["--auto-resume"]], ids=["fresh run", "auto-resume"])
def test_a_run_into_a_busy_directory_stops_in_one_line_and_sweeps_nothing(tmp_path, shards, data_tokenizer,
                                                                          resume):
    run_dir = tmp_path / "run"
    live = run_dir / "ckpt" / "step_0000007.tmp"  # what the holder is writing right now
    holder = hold_lock(run_dir)
    live.mkdir(parents=True)
    (live / "engine.pt").write_bytes(b"being written")
    try:
        started = time.monotonic()
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "tiny", "--data", str(shards),
               "--tokenizer", str(data_tokenizer.directory), "--out", str(run_dir), "--max-steps", "2",
               *resume]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {run_dir}: another process (pid {holder.pid} on {os.uname().nodename}"
                      + errors[0].split(os.uname().nodename, 1)[1]], done.stderr
    assert "Traceback" not in done.stderr
    assert (live / "engine.pt").read_bytes() == b"being written", "the live checkpoint write was swept"
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "training_config_snapshot.json").exists()
    assert time.monotonic() - started < 120
