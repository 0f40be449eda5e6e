"""Smoke tests of the benchmark plumbing (bench/): the figures themselves are not asserted."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from loader_memory import measure as measure_loader  # noqa: E402
from pngplot import Chart, Series, nice_ticks  # noqa: E402
from run_all import Row, format_table  # noqa: E402
from shakespeare_data import prepare  # noqa: E402

from minigpt.data.shards import open_shard  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402
from minigpt.train.objectives import token_byte_lengths  # noqa: E402


def read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat_length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    return width, height, zlib.decompress(data[41:41 + idat_length])


def test_chart_is_a_decodable_png_with_the_curve_drawn(tmp_path):
    chart = Chart("T", "X", "Y", series=[Series("A", [(0.0, 3.0), (50.0, 2.5), (100.0, 2.4)])])
    width, height, raw = read_png(chart.save(tmp_path / "c.png", 320, 200))
    assert (width, height) == (320, 200)
    assert len(raw) == height * (1 + 3 * width)
    blue = bytes((31, 119, 180))
    assert raw.count(blue) > 100  # the series colour is on the canvas


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 130) == [0, 25, 50, 75, 100, 125]
    ticks = nice_ticks(2.3, 4.1)
    assert ticks[0] >= 2.3 and ticks[-1] <= 4.1 and len(ticks) >= 4


def test_split_by_position_keeps_every_validation_byte(tmp_path):
    text = "".join(f"LINE {i}: to be or not to be, that is the question.\n\n" for i in range(400))
    source = tmp_path / "plays.txt"
    source.write_text(text, encoding="utf-8")
    prepared = prepare(tmp_path / "prep", 400, source=source)
    tokenizer = Tokenizer(prepared.tokenizer_dir)
    val_ids = np.asarray(open_shard(prepared.dataset_dir, "val").tokens)
    assert tokenizer.decode(val_ids.tolist()) == text[int(len(text) * 0.9):]
    assert token_byte_lengths(tokenizer).numpy()[val_ids].sum() == prepared.val_bytes


def test_loader_memory_reports_flat_anonymous_memory_for_a_small_shard(tmp_path):
    result = measure_loader(1, batches=50, scratch=tmp_path)
    assert result.anon_end_mib > 0 and result.rss_end_mib >= result.anon_end_mib
    assert not list(tmp_path.iterdir())  # the synthetic shard is deleted


def test_table_has_one_row_per_goal_with_its_verdict():
    table = format_table([Row("a", "1 tok/s", "2x", ">= 1", "pass"), Row("b", "3", "", "", "FAIL")])
    lines = table.splitlines()
    assert len(lines) == 4 and "pass" in lines[2] and "FAIL" in lines[3]


@pytest.mark.integration
def test_run_all_quick_writes_results_and_plot(tmp_path):
    if not (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt").is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    result = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(tmp_path),
                             "--skip", "deepspeed", "compile", "memory", "data", "activation", "pretokenize"], capture_output=True, text=True, timeout=600)
    assert "| goal" in result.stdout, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["name"].split(":")[0] for row in results["rows"]} >= {"quality", "throughput", "decode"}
    assert len(results["quality"]["curve"]) >= 2
    read_png(tmp_path / "quality_curve.png")


def test_moe_bench_compares_at_equal_wall_time_by_interpolating_each_curve():
    from moe import bpb_at

    curve = [(10.0, 3.0), (20.0, 2.5), (40.0, 2.0)]
    assert bpb_at(curve, 30.0) == pytest.approx(2.25)
    assert bpb_at(curve, 20.0) == pytest.approx(2.5)
    assert bpb_at(curve, 5.0) == 3.0, "before the first checkpoint: its value, nothing extrapolated"
    assert bpb_at(curve, 50.0) == 2.0


def test_gpu_check_refuses_clearly_without_a_gpu():
    """bench/gpu_check.sh is for CUDA machines (run it there as it is); here it must say so, not crash."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: run bench/gpu_check.sh itself")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
