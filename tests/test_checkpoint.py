"""Checkpoints are never lost and never trusted blindly: verified by manifest, resumed from the newest
good one, pruned by save order, written atomically even on a full disk, and loaded without running code.

Plain engine, in-process; the DeepSpeed files get the same treatment in tests/test_checkpoint_integration.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_driver import fresh_model, run_steps, train_config

from minigpt.checkpoint import (
    CKPT_DIR,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    find_resume_point,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    sweep_temporary,
    verify_checkpoint,
    write_manifest,
)
from minigpt.engine.plain import PlainEngine
from minigpt.engine.portable import ENGINE_FILE
from minigpt.safe_load import UnsafeFileError, safe_torch_load


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_payload(path: Path, marker: Path) -> None:
    torch.save({"format_version": 1, "payload": RunsCode(marker)}, path)


def new_manager(run_dir: Path, keep_last: int = 3) -> CheckpointManager:
    engine = PlainEngine(fresh_model(), train_config(world=1), torch.device("cpu"))
    return CheckpointManager(run_dir, engine, keep_last=keep_last)


def run_state(step: int = 0, tokens_seen: int = 0) -> TrainerState:
    return TrainerState(step=step, tokens_seen=tokens_seen, sampler={}, mode="pretrain", weights_from="random init",
                        precision="fp32", max_steps=100, warmup_steps=1)


def save_steps(manager: CheckpointManager, steps: list[int]) -> None:
    for step in steps:
        run_steps(manager.engine, 0, 1)
        manager.save(step, run_state(step, tokens_seen=step * 10))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with checkpoints 20, 25 and 30 (`latest` = step_0000030)."""
    save_steps(new_manager(tmp_path / "run"), [20, 25, 30])
    return tmp_path / "run"


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:07d}"


def test_manifest_lists_every_file_with_size_and_sha256(run_dir):
    manifest = json.loads((ckpt(run_dir, 30) / MANIFEST).read_text())["files"]
    assert set(manifest) == {ENGINE_FILE, TRAINER_STATE, "rng_rank0.json"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in manifest.values())
    assert verify_checkpoint(ckpt(run_dir, 30))["step"] == 30


def test_rng_state_is_json_and_resume_restores_python_numpy_and_torch(tmp_path):
    manager = new_manager(tmp_path / "run")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    manager.save(1, replace(run_state(1), rng=rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert json.loads((ckpt(tmp_path / "run", 1) / "rng_rank0.json").read_text())["numpy"]["kind"] == "MT19937"
    state = manager.load(find_resume_point(tmp_path / "run"))
    untouched = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert untouched == (random.random(), np.random.rand(), torch.rand(1).item())  # reading it changes nothing
    set_rng_state(state.rng)  # what Trainer.load_state_dict does with the state the manager read back
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("how", ["garbage", "missing", "non-utf8", "absolute path", "outside the run",
                                 "names a missing folder"])
def test_auto_resume_uses_the_newest_good_checkpoint_when_latest_is_unusable(run_dir, tmp_path, how):
    other = tmp_path / "other_run"
    save_steps(new_manager(other), [99])
    latest = run_dir / LATEST
    if how == "missing":
        latest.unlink()
    else:
        latest.write_bytes({"garbage": b"\x00zzz not a name\n", "non-utf8": b"\xff\xfestep\n",
                            "absolute path": f"{ckpt(other, 99)}\n".encode(),
                            "outside the run": b"../../other_run/ckpt/step_0000099\n",
                            "names a missing folder": b"step_0000035\n"}[how])
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 30) and point.state["step"] == 30
    if how != "missing":
        assert any(str(latest) in note for note in point.skipped), point.skipped


@pytest.mark.parametrize("how", ["emptied", "no trainer state"])
def test_auto_resume_skips_an_incomplete_newest_checkpoint_and_says_why(run_dir, how):
    newest = ckpt(run_dir, 30)
    if how == "emptied":
        shutil.rmtree(newest)
        newest.mkdir()
    else:
        (newest / TRAINER_STATE).unlink()
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25)
    assert any("skipped step_0000030" in note for note in point.skipped), point.skipped


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:  # emptied
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "emptied"])
@pytest.mark.parametrize("name", [ENGINE_FILE, "rng_rank0.json", TRAINER_STATE, MANIFEST])
def test_a_damaged_file_falls_back_to_the_previous_checkpoint_or_is_refused_by_name(run_dir, name, how):
    damage(ckpt(run_dir, 30) / name, how)
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25), "auto-resume must fall back to the newest intact checkpoint"
    with pytest.raises(CheckpointError, match=str(ckpt(run_dir, 30))):
        resolve_checkpoint(ckpt(run_dir, 30))  # --resume of exactly that checkpoint: refused, with the file


def test_resuming_a_run_directory_skips_damage_like_auto_resume(run_dir):
    damage(ckpt(run_dir, 30) / ENGINE_FILE, "truncated")
    assert resolve_checkpoint(run_dir).path == ckpt(run_dir, 25)
    assert resolve_checkpoint(run_dir / CKPT_DIR).path == ckpt(run_dir, 25)


def test_checkpoints_that_all_fail_verification_stop_the_run_instead_of_starting_fresh(run_dir):
    for step in (20, 25, 30):
        damage(ckpt(run_dir, step) / ENGINE_FILE, "truncated")
    with pytest.raises(CheckpointError, match="none is loadable"):
        find_resume_point(run_dir)


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert find_resume_point(tmp_path) is None


def test_a_pickle_payload_in_a_checkpoint_never_runs(run_dir, tmp_path):
    marker = tmp_path / "code_ran"
    target = ckpt(run_dir, 30)
    victim = ENGINE_FILE
    plant_payload(target / victim, marker)
    # Replaced behind the manifest's back: the digest no longer matches, the checkpoint is skipped.
    assert find_resume_point(run_dir).path == ckpt(run_dir, 25)
    # Manifest rewritten too (whoever can write the folder can): the weights-only load refuses the file.
    (target / MANIFEST).unlink()
    write_manifest(target)
    manager = new_manager(tmp_path / "fresh")
    point = find_resume_point(run_dir)
    assert point.path == target
    with pytest.raises(CheckpointError, match=f"{target / victim}.*refused to load"):
        manager.load(point)
    assert not marker.exists(), "unpickling a checkpoint ran code"


def test_the_weights_only_loader_names_damaged_and_hostile_files(tmp_path):
    plant_payload(tmp_path / "evil.pt", tmp_path / "ran")
    with pytest.raises(UnsafeFileError, match="evil.pt: refused"):
        safe_torch_load(tmp_path / "evil.pt")
    (tmp_path / "short.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnsafeFileError, match="short.pt: damaged"):
        safe_torch_load(tmp_path / "short.pt")
    assert not (tmp_path / "ran").exists()


def test_after_a_rollback_new_saves_are_kept_and_auto_resume_continues_from_them(run_dir):
    manager = new_manager(run_dir, keep_last=3)
    manager.load(resolve_checkpoint(ckpt(run_dir, 20)))
    save_steps(manager, [21, 22, 23])
    kept = sorted(p.name for p in (run_dir / CKPT_DIR).iterdir())
    assert kept == ["step_0000021", "step_0000022", "step_0000023"]
    assert (run_dir / LATEST).read_text().strip() == "step_0000023"
    assert find_resume_point(run_dir).path == ckpt(run_dir, 23)


def test_keep_last_one_never_deletes_the_checkpoint_just_written(tmp_path):
    manager = new_manager(tmp_path / "run", keep_last=1)
    save_steps(manager, [10])
    manager.load(resolve_checkpoint(ckpt(tmp_path / "run", 10)))
    save_steps(manager, [6])  # a lower step than the one on disk, but the newest save
    assert [p.name for p in (tmp_path / "run" / CKPT_DIR).iterdir()] == ["step_0000006"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                  "basic_ios::clear: iostream error")])
def test_a_full_disk_during_a_save_leaves_no_temporary_folder_and_the_previous_checkpoint(run_dir, monkeypatch,
                                                                                          failure):
    manager = new_manager(run_dir)
    real_save = manager.engine.save

    def save_then_fail(directory: Path) -> None:
        real_save(directory)
        raise failure

    monkeypatch.setattr(manager.engine, "save", save_then_fail)
    monkeypatch.setattr("minigpt.checkpoint.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(CheckpointError, match=r"disk full while writing .*step_0000035\.tmp/engine\.pt"):
        manager.save(35, run_state(35))
    assert not list((run_dir / CKPT_DIR).glob("*.tmp"))
    assert (run_dir / LATEST).read_text().strip() == "step_0000030"
    assert find_resume_point(run_dir).path == ckpt(run_dir, 30)


def test_start_up_sweeps_what_interrupted_writes_left(run_dir):
    (run_dir / CKPT_DIR / "step_0000035.tmp").mkdir()
    (run_dir / CKPT_DIR / "step_0000035.tmp" / ENGINE_FILE).write_bytes(b"half")
    (run_dir / "latest.tmp").write_text("step_0000035\n")
    (run_dir / ".final.tmp-1a2b3c4d").mkdir()  # a consolidation that never finished
    (run_dir / ".final.old-5e6f7a8b").mkdir()  # the final/ it was to replace, put aside: the only copy
    (run_dir / ".final.old-5e6f7a8b" / "model.pt").write_bytes(b"weights")
    (run_dir / ".notes.tmp-mine").write_text("the user's")
    removed = sweep_temporary(run_dir)
    assert len(removed) == 4 and not list(run_dir.rglob("*.tmp")) and not list(run_dir.glob(".final.*"))
    assert (run_dir / "final" / "model.pt").read_bytes() == b"weights", "the only copy of final/ was lost"
    assert (run_dir / ".notes.tmp-mine").read_text() == "the user's"
    assert find_resume_point(run_dir).path == ckpt(run_dir, 30)


def test_a_pickle_beside_the_json_rng_file_is_never_read(run_dir, tmp_path):
    """RNG state is read from rng_rank<r>.json only; a listed pickle of any other name is never unpickled."""
    marker = tmp_path / "code_ran"
    target = ckpt(run_dir, 30)
    plant_payload(target / "rng_rank0.pt", marker)
    (target / MANIFEST).unlink()
    write_manifest(target)
    new_manager(run_dir).load(find_resume_point(run_dir))
    assert not marker.exists(), "unpickling a checkpoint ran code"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", [2, None, "1"])
def test_a_checkpoint_of_another_format_version_is_refused_by_name_and_kept(run_dir, version):
    target = ckpt(run_dir, 30)
    path = target / MANIFEST
    manifest = json.loads(path.read_text())
    if version is None:
        del manifest["format_version"]
    else:
        manifest["format_version"] = version
    path.write_text(json.dumps(manifest))
    before = snapshot(target)
    says = f"{path}: checkpoint format version {version!r}; this MiniGPT reads version {FORMAT_VERSION}"
    with pytest.raises(CheckpointError) as refused:
        resolve_checkpoint(target)
    assert str(refused.value) == says
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25)
    assert any(says in note for note in point.skipped), point.skipped
    manager = new_manager(run_dir, keep_last=1)
    manager.load(point)
    save_steps(manager, [26])  # a save prunes the checkpoints it can read, never the refused one
    assert snapshot(target) == before
    assert not ckpt(run_dir, 20).exists()


def test_a_checkpoint_without_a_manifest_is_refused_naming_the_version_it_lacks(run_dir):
    target = ckpt(run_dir, 30)
    (target / MANIFEST).unlink()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=f"{target / MANIFEST}: missing, so the checkpoint has no format "
                                              f"version; this MiniGPT reads checkpoint format version "
                                              f"{FORMAT_VERSION}"):
        resolve_checkpoint(target)
    assert find_resume_point(run_dir).path == ckpt(run_dir, 25)
    assert snapshot(target) == before


def test_resuming_a_plain_checkpoint_never_imports_deepspeed(run_dir):
    """A plain run (and the generator) must not pay DeepSpeed's import, nor print its accelerator banner."""
    code = ("import sys; from pathlib import Path; from minigpt.checkpoint import find_resume_point; "
            "from engine_driver import fresh_model, train_config; from minigpt.engine.plain import PlainEngine; "
            "from minigpt.checkpoint import CheckpointManager; import torch; "
            f"m = CheckpointManager(Path({str(run_dir)!r}), PlainEngine(fresh_model(), train_config(world=1), "
            "torch.device('cpu'))); m.load(find_resume_point(m.run_dir)); print('deepspeed' in sys.modules)")
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests.parent,
                          env={**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
