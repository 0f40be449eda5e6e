"""Durable writes: every artefact is replaced atomically and flushed (file and directory) before it counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minigpt import fsutil
from minigpt.monitor import truncate_metrics


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """Paths passed to os.fsync, in order (files and directories)."""
    seen: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_atomic_write_text_replaces_the_file_and_flushes_it_and_its_directory(tmp_path, fsynced):
    target = tmp_path / "latest"
    target.write_text("old\n")
    fsutil.atomic_write_text(target, "new ✓\n")
    assert target.read_text(encoding="utf-8") == "new ✓\n"
    assert os.listdir(tmp_path) == ["latest"]
    assert tmp_path in fsynced and len(fsynced) == 2


def test_failed_atomic_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old\n")

    def half_then_fail(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        fsutil.atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["state.json"]


def test_atomic_torch_save_round_trips_weights_only(tmp_path, fsynced):
    fsutil.atomic_torch_save({"a": torch.arange(3)}, tmp_path / "cache.pt")
    assert torch.equal(torch.load(tmp_path / "cache.pt", weights_only=True)["a"], torch.arange(3))
    assert tmp_path in fsynced


def test_replace_dir_swaps_a_complete_directory_in_and_the_old_one_out(tmp_path, fsynced):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    staging = fsutil.make_staging_dir(tmp_path, ".out.tmp-")
    (staging / "new.txt").write_text("new")
    fsutil.replace_dir(staging, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new.txt"]
    assert tmp_path in fsynced


def test_truncating_metrics_on_resume_is_flushed_to_disk(tmp_path, fsynced):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    truncate_metrics(path, start_step=2)
    assert path.read_text() == '{"step": 1}\n'
    assert [p.parent for p in fsynced] == [tmp_path, tmp_path.parent]  # the rewritten file, then its directory
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
