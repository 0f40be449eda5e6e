"""Checkpoints are ordered by save, never by a clock, and every file that decides the fallback is verified
against the manifest before it is parsed: damage of any shape skips to the next older good checkpoint
with one line naming the file, and a verified trainer state of the wrong shape is refused by field.

Plain engine, in-process (the fixtures of tests/test_checkpoint.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_checkpoint import ckpt, new_manager, save_steps

from minigpt.checkpoint import (
    CKPT_DIR,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    find_resume_point,
    resolve_checkpoint,
    write_manifest,
)

HOUR = 3600.0


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """Checkpoints 20, 25 and 30 (`latest` = step_0000030), saved once for the module."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    save_steps(new_manager(run_dir), [20, 25, 30])
    return run_dir


@pytest.fixture
def run_dir(saved_run, tmp_path) -> Path:
    """A copy of `saved_run` for one test to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def kept_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / CKPT_DIR).iterdir())


@pytest.fixture
def clock(monkeypatch):
    """The wall clock the checkpoint code sees, set by the test (`clock.offset` seconds from now)."""
    import time as real_time

    class Clock:
        offset = 0.0

    fake = Clock()
    monkeypatch.setattr("minigpt.checkpoint.time.time", lambda: real_time.monotonic() + 1e9 + fake.offset)
    return fake


@pytest.mark.parametrize("skew", [-HOUR, HOUR], ids=["clock behind", "clock ahead"])
def test_a_skewed_clock_never_prunes_or_resumes_the_wrong_checkpoints(tmp_path, clock, skew):
    run_dir = tmp_path / "run"
    manager = new_manager(run_dir, keep_last=3)
    clock.offset = 0.0 if skew < 0 else HOUR  # ahead: the first node's clock ran fast
    save_steps(manager, [2, 4, 6, 8, 10])
    clock.offset = skew if skew < 0 else 0.0  # the run requeued onto a node whose clock differs
    save_steps(new_manager(run_dir, keep_last=3), [12, 14, 16])
    assert kept_steps(run_dir) == [12, 14, 16]
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 16) and point.skipped == []


def test_after_a_rollback_on_a_slower_clock_the_new_saves_are_still_the_newest(tmp_path, clock):
    run_dir = tmp_path / "run"
    save_steps(new_manager(run_dir), [10, 20, 30])
    clock.offset = -HOUR
    manager = new_manager(run_dir, keep_last=3)
    manager.load(resolve_checkpoint(ckpt(run_dir, 10)))
    save_steps(manager, [11, 12])
    assert kept_steps(run_dir) == [11, 12, 30]
    assert find_resume_point(run_dir).path == ckpt(run_dir, 12)


def test_the_same_step_saved_again_replaces_the_old_one_and_counts_as_newest(tmp_path):
    run_dir = tmp_path / "run"
    manager = new_manager(run_dir, keep_last=3)
    save_steps(manager, [5, 10])
    manager.load(resolve_checkpoint(ckpt(run_dir, 5)))
    save_steps(manager, [5])
    assert find_resume_point(run_dir).path == ckpt(run_dir, 5)
    assert (run_dir / LATEST).read_text().strip() == "step_0000005"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MANIFEST_DAMAGE = {
    "bytes Infinity": lambda text: text.replace('"bytes": ', '"bytes": Infinity, "was": ', 1),
    "bytes 1e999": lambda text: text.replace('"bytes": ', '"bytes": 1e999, "was": ', 1),
    "nested 100k deep": lambda text: nested(100_000),
    "bytes a string": lambda text: text.replace('"bytes": ', '"bytes": "12", "was": ', 1),
    "files a list": lambda text: '{"format_version": 1, "files": []}',
    "name outside the folder": lambda text: text.replace('"engine.pt"', '"../../x"'),
    "larger than any manifest": lambda text: text + " " * (5 << 20),
}


@pytest.mark.parametrize("how", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_skipped_with_its_name_never_a_traceback(run_dir, how):
    path = ckpt(run_dir, 30) / MANIFEST
    path.write_text(MANIFEST_DAMAGE[how](path.read_text()))
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25)
    assert any(str(path) in note and "skipped step_0000030" in note for note in point.skipped), point.skipped
    with pytest.raises(CheckpointError, match=str(path)):
        resolve_checkpoint(ckpt(run_dir, 30))


@pytest.mark.parametrize("content", [nested(100_000), '{"step": 30, "saved_at": Infinity}', "x" * (9 << 20)],
                         ids=["nested 100k deep", "Infinity", "huge"])
def test_a_damaged_trainer_state_is_verified_before_it_is_read(run_dir, content):
    path = ckpt(run_dir, 30) / TRAINER_STATE
    path.write_text(content)
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25)
    assert any(str(path) in note for note in point.skipped), point.skipped


def rewrite_state(checkpoint: Path, **changes) -> Path:
    """Change fields of a checkpoint's trainer state and re-sign it (as someone who can write the folder
    could): the manifest verifies, so only the typed check stands between the values and the run."""
    path = checkpoint / TRAINER_STATE
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)
    return path


@pytest.mark.parametrize(("field", "value", "says"), [
    ("tokens_seen", "250", "tokens_seen must be a non-negative integer"),
    ("sampler", None, "sampler must be an object"),
    ("step", 30.0, "step must be a non-negative integer"),
    ("precision", "fp64", "precision must be one of"),
    ("elapsed_seconds", -1, "elapsed_seconds must be a non-negative number"),
    ("compiled", "yes", "compiled must be true or false"),
])
def test_a_verified_trainer_state_of_the_wrong_shape_is_refused_by_field(run_dir, field, value, says):
    path = rewrite_state(ckpt(run_dir, 30), **{field: value})
    with pytest.raises(CheckpointError, match=f"{path}: {says}"):
        resolve_checkpoint(ckpt(run_dir, 30))
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 25)
    assert any(f"{path}: {says}" in note for note in point.skipped), point.skipped


def test_a_trainer_state_without_its_save_index_is_refused_by_name(run_dir):
    path = rewrite_state(ckpt(run_dir, 30))
    state = json.loads(path.read_text())
    del state["save_index"]
    path.write_text(json.dumps(state))
    (ckpt(run_dir, 30) / MANIFEST).unlink()
    write_manifest(ckpt(run_dir, 30))
    with pytest.raises(CheckpointError, match=f"{path}: no 'save_index' field"):
        resolve_checkpoint(ckpt(run_dir, 30))
    assert find_resume_point(run_dir).path == ckpt(run_dir, 25)


def test_a_verified_rng_file_of_the_wrong_shape_is_refused_by_name(run_dir, tmp_path):
    checkpoint = ckpt(run_dir, 30)
    (checkpoint / "rng_rank0.json").write_text('{"python": {"version": 3}, "numpy": null}')
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)
    manager = new_manager(tmp_path / "fresh")
    with pytest.raises(CheckpointError, match=f"{checkpoint / 'rng_rank0.json'}: damaged RNG state"):
        manager.load(resolve_checkpoint(checkpoint))


def test_a_huge_latest_file_is_ignored_with_a_note(run_dir):
    (run_dir / LATEST).write_bytes(b"step_0000030" + b" " * (2 << 20))
    point = find_resume_point(run_dir)
    assert point.path == ckpt(run_dir, 30)
    assert any(str(run_dir / LATEST) in note for note in point.skipped), point.skipped
