"""End-to-end runs of launch/train.py: exact resume after a signal, crash-safe checkpoints, DeepSpeed
2-rank runs resumed by either engine, ZeRO-3 consolidation read back by the standalone generator.

Every run is a real process: `python launch/train.py` (plain engine) or `deepspeed --num_gpus 2
launch/train.py` (CPU accelerator, gloo).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import free_port  # noqa: E402

from minigpt.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
COMMON = ["--config", "tiny", "--seq-len", "64", "--batch-size", "16", "--warmup-steps", "3",
          "--learning-rate", "3e-3", "--eval-interval", "0", "--eval-batches", "2", "--log-interval", "1"]


def train_cmd(data: Path, tokenizer: Path, out: Path, *extra: str, deepspeed: bool = False) -> list[str]:
    args = [*COMMON, "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), *extra]
    if deepspeed:
        port = str(free_port())
        return ["deepspeed", "--num_gpus", "2", "--master_port", port, str(REPO / "launch" / "train.py"), *args]
    return [sys.executable, str(REPO / "launch" / "train.py"), *args]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train":
            losses[record["step"]] = record["loss"]
    return losses


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final" / "model.pt", weights_only=True)


def interrupt_after(cmd: list[str], run_dir: Path, steps: int, sig: int = signal.SIGTERM) -> subprocess.Popen:
    """Start `cmd` in its own process group; once `steps` train steps are logged send `sig` to the whole
    group (as a terminal's Ctrl-C or a scheduler does); return when every process of it has exited."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.02)
    proc.output = proc.communicate(timeout=300)[0]
    while time.monotonic() < deadline:  # the launcher may exit before its ranks finish saving
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return proc


def assert_same_run(a: Path, b: Path) -> None:
    losses_a, losses_b = train_losses(a), train_losses(b)
    assert sorted(losses_a) == sorted(losses_b)
    assert losses_a == losses_b, "resumed loss curve differs from the uninterrupted one"
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_plain_run_stopped_by_sigterm_resumes_bitwise_identical(shards, data_tokenizer, tmp_path):
    steps = ["--max-steps", "40", "--save-interval", "100"]
    reference = tmp_path / "reference"
    done = run(train_cmd(shards, data_tokenizer.directory, reference, *steps))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    resumed = tmp_path / "resumed"
    cmd = train_cmd(shards, data_tokenizer.directory, resumed, *steps, "--auto-resume")
    stopped = interrupt_after(cmd, resumed, steps=8)
    output = stopped.output
    assert stopped.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "SIGTERM received" in output
    saved_at = json.loads((resumed / "ckpt" / (resumed / "latest").read_text().strip() / "trainer_state.json")
                          .read_text())["step"]
    assert 8 <= saved_at < 40
    finished = run(cmd)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and f"at step {saved_at}" in finished.stdout
    assert_same_run(reference, resumed)


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_previous_checkpoint(shards, data_tokenizer, tmp_path):
    """Checkpoint every step, SIGKILL at several moments: `latest` always names a complete checkpoint."""
    out = tmp_path / "run"
    cmd = train_cmd(shards, data_tokenizer.directory, out, "--max-steps", "60", "--save-interval", "1",
                    "--keep-last", "2", "--auto-resume")
    for lines in (3, 6, 9):
        proc = interrupt_after(cmd, out, steps=lines, sig=signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
        latest = (out / "latest").read_text().strip()
        state = json.loads((out / "ckpt" / latest / "trainer_state.json").read_text())
        assert (out / "ckpt" / latest / "engine.pt").is_file() and state["step"] >= 1
    finished = run(cmd)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resumed from" in finished.stdout
    assert not list((out / "ckpt").glob("*.tmp")), "a stale temporary checkpoint was left behind"
    assert len([p for p in (out / "ckpt").iterdir()]) <= 2


@pytest.mark.deepspeed
def test_deepspeed_two_ranks_resume_bitwise_and_continue_on_the_plain_engine(shards, data_tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    steps = ["--max-steps", "40", "--save-interval", "100", "--batch-size", "8",
             "--ds-config", str(REPO / "ds_configs" / "zero2.json")]
    reference = tmp_path / "reference"
    done = run(train_cmd(shards, data_tokenizer.directory, reference, *steps, deepspeed=True))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    losses = train_losses(reference)
    assert losses[39] < losses[0] - 0.5, losses

    # SIGTERM to the launcher: it forwards SIGTERM to both ranks, which agree and save the same step.
    resumed = tmp_path / "resumed"
    cmd = train_cmd(shards, data_tokenizer.directory, resumed, *steps, "--auto-resume", deepspeed=True)
    stopped = interrupt_after(cmd, resumed, steps=5)
    assert stopped.returncode != 0
    assert (resumed / "latest").is_file(), stopped.output[-4000:]
    latest = resumed / "ckpt" / (resumed / "latest").read_text().strip()
    saved_at = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 5 <= saved_at < 40
    assert sorted(p.name for p in latest.glob("rng_rank*")) == ["rng_rank0.json", "rng_rank1.json"]
    cross = tmp_path / "cross"
    shutil.copytree(resumed, cross)
    finished = run(cmd)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert_same_run(reference, resumed)

    # The same 2-rank checkpoint continued by the plain engine with the same global batch (16 = 2 x 8).
    plain_steps = [s if s != "8" else "16" for s in steps[:-2]]
    plain = run(train_cmd(shards, data_tokenizer.directory, cross, *plain_steps, "--auto-resume"))
    assert plain.returncode == 0, plain.stdout[-4000:] + plain.stderr[-4000:]
    plain_losses, ds_losses = train_losses(cross), train_losses(reference)
    for step in range(saved_at, 40):
        assert abs(plain_losses[step] - ds_losses[step]) < 1e-3, (step, plain_losses[step], ds_losses[step])


@pytest.mark.deepspeed
def test_zero3_consolidated_weights_generate_the_same_text_standalone(shards, data_tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    # --max-time (far from reached) also runs the ranks' per-step agreement on the time spent.
    done = run(train_cmd(shards, data_tokenizer.directory, out, "--max-steps", "12", "--batch-size", "8",
                         "--sample-prompt", "The module", "--ds-config", str(REPO / "ds_configs" / "zero3.json"),
                         "--max-time", "1h", deepspeed=True))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "in 0 s of 3600 s" not in done.stdout and " s of 3600 s; consolidated" in done.stdout
    # The 2-rank console reads like a 1-rank one: what the ranks print is said once (the launcher's own
    # two processes still announce the CPU accelerator; that is DeepSpeed's launcher, not our ranks).
    console = done.stdout + done.stderr
    assert console.count("Setting accelerator to CPU") <= 2, console[-4000:]
    assert console.count("[minigpt] device ") == 1 and console.count("built successfully") <= 1
    assert "FutureWarning" not in console
    assert console.count("done: 12 steps") == 1 and "step 12 sample:" in console
    engine_sample = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])["text"]
    weights = final_weights(out)
    assert all(t.numel() > 0 for t in weights.values()), "ZeRO-3 placeholders were saved instead of weights"
    generated = run([sys.executable, str(REPO / "launch" / "generate.py"), "--model", str(out / "final"),
                     "--prompt", "The module", "--greedy", "--max-new-tokens", "48"])
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert engine_sample.strip() and engine_sample.strip() in generated.stdout


def test_bad_inputs_fail_before_training_with_the_culprit_named(shards, data_tokenizer, tmp_path, demo_corpus):
    from minigpt.tokenizer_training import train_tokenizer

    other = train_tokenizer([demo_corpus], tmp_path / "other_tok", vocab_size=400)
    mismatch = run(train_cmd(shards, other.directory, tmp_path / "a", "--max-steps", "2"))
    assert mismatch.returncode == 2 and "meta.json" in mismatch.stderr and "tokenizer" in mismatch.stderr

    bad_ds = tmp_path / "bad_ds.json"
    bad_ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 1}}))
    inconsistent = run(train_cmd(shards, data_tokenizer.directory, tmp_path / "b", "--max-steps", "2",
                                 "--ds-config", str(bad_ds), "--dry-run"))
    assert inconsistent.returncode == 2 and "bad_ds.json" in inconsistent.stderr
    assert "train_micro_batch_size_per_gpu" in inconsistent.stderr

    first = tmp_path / "c"
    assert run(train_cmd(shards, data_tokenizer.directory, first, "--max-steps", "2")).returncode == 0
    wider = run(train_cmd(shards, data_tokenizer.directory, tmp_path / "d", "--max-steps", "4", "--config", "small",
                          "--seq-len", "64", "--resume", str(first)))
    assert wider.returncode == 2 and "step_0000002" in wider.stderr, wider.stderr[-2000:]

    assert run(train_cmd(shards, data_tokenizer.directory, tmp_path / "e", "--no-such-flag")).returncode == 2
    missing = run(train_cmd(tmp_path / "nowhere", data_tokenizer.directory, tmp_path / "f"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    too_small = run(train_cmd(shards, data_tokenizer.directory, tmp_path / "g", "--batch-size", "100000"))
    assert too_small.returncode == 2 and "one optimizer step needs 100000" in too_small.stderr, too_small.stderr[-2000:]
    assert "Traceback" not in too_small.stderr


def test_dry_run_prints_the_plan_and_trains_nothing(shards, data_tokenizer, tmp_path):
    out = tmp_path / "dry"
    result = run(train_cmd(shards, data_tokenizer.directory, out, "--max-steps", "7", "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "tokens/step" in result.stdout and "7" in result.stdout and "plain on cpu" in result.stdout
    assert not (out / "ckpt").exists()
