"""End to end through launch/train.py: damaged, hostile and half-written checkpoints meet `--auto-resume`.

Each case copies one finished run and damages it the way a crash, a full disk or an attacker would; the
resumed run must continue from the newest good checkpoint, or stop with one line naming the file, and
never run code from a checkpoint. DeepSpeed cases use the DeepSpeed engine in a world of one (`--ds-config`
under plain python), which writes and reads the same files as a multi-rank run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_checkpoint import RunsCode
from test_train_integration import final_weights, run, train_cmd, train_losses

from minigpt.checkpoint import MANIFEST, find_resume_point, write_manifest

pytestmark = pytest.mark.integration
STEPS = ["--max-steps", "30", "--save-interval", "5", "--keep-last", "3"]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "ckpt" / f"step_{step:07d}"


def final_step(run_dir: Path) -> int:
    return json.loads((run_dir / "final" / "config.json").read_text())["extra"]["step"]


def rewrite_manifest(checkpoint: Path) -> None:
    """What an attacker who can write the folder does after planting a file."""
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)


def plant_payload(path: Path, marker: Path) -> None:
    torch.save({"payload": RunsCode(marker)}, path)


@pytest.fixture(scope="module")
def plain_run(shards, data_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "run"
    done = run(train_cmd(shards, data_tokenizer.directory, out, *STEPS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def resume(run_dir: Path, shards: Path, tokenizer, *extra: str) -> subprocess.CompletedProcess:
    return run(train_cmd(shards, tokenizer.directory, run_dir, *STEPS, "--auto-resume", *extra))


def test_garbage_latest_resumes_from_the_newest_checkpoint_and_keeps_the_run(plain_run, shards, data_tokenizer,
                                                                            tmp_path):
    out = copy_run(plain_run, tmp_path)
    (out / "latest").write_bytes(b"\xff\xfe garbage")
    metrics_before = (out / "metrics.jsonl").read_text()
    done = resume(out, shards, data_tokenizer)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "starting fresh" not in done.stdout
    assert f"resumed from {ckpt(out, 30)} at step 30" in done.stdout
    assert "not UTF-8" in done.stdout
    assert (out / "metrics.jsonl").read_text().startswith(metrics_before), "metrics of the run were dropped"
    assert final_step(out) == 30
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"step_{s:07d}" for s in (20, 25, 30)]


def test_a_truncated_newest_checkpoint_falls_back_and_finishes_identically(plain_run, shards, data_tokenizer,
                                                                           tmp_path):
    out = copy_run(plain_run, tmp_path)
    engine_file = ckpt(out, 30) / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:1000])
    done = resume(out, shards, data_tokenizer)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped step_0000030" in done.stdout and "truncated" in done.stdout
    assert f"resumed from {ckpt(out, 25)} at step 25" in done.stdout
    assert train_losses(out) == train_losses(plain_run)
    weights, reference = final_weights(out), final_weights(plain_run)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_pickle_payload_in_the_rng_file_is_refused_and_never_runs(plain_run, shards, data_tokenizer, tmp_path):
    out = copy_run(plain_run, tmp_path)
    marker = tmp_path / "code_ran"
    plant_payload(ckpt(out, 30) / "rng_rank0.json", marker)
    rewrite_manifest(ckpt(out, 30))
    done = resume(out, shards, data_tokenizer)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{ckpt(out, 30) / 'rng_rank0.json'}:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "unpickling the checkpoint ran code"


@pytest.fixture(scope="module")
def deepspeed_run(shards, data_tokenizer, tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="the DeepSpeed checkpoint cases need the deepspeed package")
    out = tmp_path_factory.mktemp("ds") / "run"
    done = run(train_cmd(shards, data_tokenizer.directory, out, *STEPS, "--ds-config", "ds_configs/zero2.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.deepspeed
@pytest.mark.parametrize(("victim", "engine"), [("zero_pp_rank_0_mp_rank_00_optim_states.pt", "deepspeed"),
                                                ("mp_rank_00_model_states.pt", "deepspeed"),
                                                ("mp_rank_00_model_states.pt", "plain")])
def test_a_pickle_payload_in_deepspeed_files_is_refused_by_either_engine(deepspeed_run, shards, data_tokenizer,
                                                                        tmp_path, victim, engine):
    out = copy_run(deepspeed_run, tmp_path)
    marker = tmp_path / "code_ran"
    plant_payload(ckpt(out, 30) / victim, marker)
    rewrite_manifest(ckpt(out, 30))
    extra = ["--ds-config", "ds_configs/zero2.json"] if engine == "deepspeed" else []
    done = resume(out, shards, data_tokenizer, *extra)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{ckpt(out, 30) / victim}: refused to load" in done.stderr
    assert not marker.exists(), "unpickling the DeepSpeed checkpoint ran code"


@pytest.mark.deepspeed
def test_a_damaged_deepspeed_checkpoint_falls_back_to_the_previous_one(deepspeed_run, shards, data_tokenizer,
                                                                       tmp_path):
    out = copy_run(deepspeed_run, tmp_path)
    optim = ckpt(out, 30) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-10])
    done = resume(out, shards, data_tokenizer, "--ds-config", "ds_configs/zero2.json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpt(out, 25)} at step 25" in done.stdout
    assert final_step(out) == 30


@pytest.mark.deepspeed
def test_every_file_of_a_deepspeed_checkpoint_is_verified_before_anything_is_loaded(deepspeed_run, tmp_path):
    names = sorted(p.name for p in ckpt(deepspeed_run, 30).iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in names and "engine_meta.json" in names
    for name in names:
        out = tmp_path / name
        shutil.copytree(deepspeed_run / "ckpt", out / "ckpt")
        victim = ckpt(out, 30) / name
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        point = find_resume_point(out)
        assert point.path == ckpt(out, 25), name
        assert any(name in note for note in point.skipped), (name, point.skipped)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs: room for one checkpoint of `tiny` at vocab 600 (~10 MB) but not two."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_once_there_is_room(shards, data_tokenizer,
                                                                                      small_tmpfs):
    out = small_tmpfs / "run"
    steps = ["--max-steps", "12", "--save-interval", "5", "--keep-last", "1", "--auto-resume"]
    cmd = train_cmd(shards, data_tokenizer.directory, out, *steps)
    full = run(cmd)
    assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
    assert "error: disk full while writing" in full.stderr and "step_0000010.tmp" in full.stderr
    assert "Traceback" not in full.stderr
    assert not list((out / "ckpt").glob("*.tmp")), "the half-written checkpoint was left behind"
    assert (out / "latest").read_text().strip() == "step_0000005"

    again = run(cmd)  # still no room: the same clear failure, after resuming, with nothing lost
    assert again.returncode == 2 and "disk full" in again.stderr, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {ckpt(out, 5)}" in again.stdout

    subprocess.run(["mount", "-o", "remount,size=96m", str(small_tmpfs)], check=True)
    done = run(cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpt(out, 5)} at step 5" in done.stdout
    assert final_step(out) == 12


def resign_state(checkpoint: Path, **changes) -> Path:
    """Change trainer-state fields and rewrite the manifest, so the checkpoint verifies."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    for name, value in changes.items():
        target = state["sampler"] if name.startswith("sampler.") else state
        target[name.removeprefix("sampler.")] = value
    path.write_text(json.dumps(state))
    rewrite_manifest(checkpoint)
    return path


def test_a_trainer_state_nested_too_deeply_falls_back_to_the_previous_checkpoint(plain_run, shards,
                                                                                 data_tokenizer, tmp_path):
    out = copy_run(plain_run, tmp_path)
    (ckpt(out, 30) / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    done = resume(out, shards, data_tokenizer)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped step_0000030" in done.stdout and "trainer_state.json" in done.stdout
    assert f"resumed from {ckpt(out, 25)} at step 25" in done.stdout
    assert final_step(out) == 30


@pytest.mark.parametrize(("field", "value", "says"), [
    ("sampler.position", -3, "sampler.position must be a non-negative integer"),
    ("sampler.position", 1e30, "sampler.position must be a non-negative integer"),
    ("sampler.position", 10**12, "sampler.position must be an integer from 0 to"),
])
def test_a_verified_sampler_state_out_of_range_stops_the_run_by_field(plain_run, shards, data_tokenizer,
                                                                      tmp_path, field, value, says):
    out = copy_run(plain_run, tmp_path)
    path = resign_state(ckpt(out, 30), **{field: value})
    done = resume(out, shards, data_tokenizer)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        line for line in done.stderr.splitlines() if line.startswith(f"error: {path}: {says}")]
    assert f"error: {path}: {says}" in done.stderr and "Traceback" not in done.stderr
    assert final_step(out) == 30 and "step 31" not in done.stdout


@pytest.mark.deepspeed
def test_when_only_the_main_rank_fails_to_resume_every_rank_says_why_within_seconds(plain_run, shards,
                                                                                    data_tokenizer, tmp_path):
    pytest.importorskip("deepspeed", reason="a 2-rank run needs the deepspeed launcher")
    out = copy_run(plain_run, tmp_path)
    manifest = ckpt(out, 30) / MANIFEST
    manifest.write_text(manifest.read_text().replace('"bytes": ', '"bytes": Infinity, "was": ', 1))
    cmd = train_cmd(shards, data_tokenizer.directory, tmp_path / "resumed", *STEPS, "--resume",
                    str(ckpt(out, 30)), deepspeed=True)
    done = run(cmd)
    assert done.returncode != 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert f"error: {manifest}: not valid JSON" in output, output[-3000:]
    told = ("error: the main rank stopped while choosing the checkpoint to resume from: "
            f"{manifest}: not valid JSON")
    assert told in output, output[-3000:]
    assert "Connection closed by peer" not in output and "Traceback" not in output, output[-3000:]
