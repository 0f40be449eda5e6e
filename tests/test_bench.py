"""Smoke tests of the benchmark plumbing (bench/): the figures themselves are not asserted."""

from __future__ import annotations

import json
import math
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
from quality import QualityResult, run_decisions  # noqa: E402
from run_all import (  # noqa: E402
    AVX2_ONLY_GOAL_BPB,
    NATIVE_BF16_GOAL_BPB,
    Row,
    emulation_skipped_reason,
    format_precision_facts,
    format_table,
    mfu_figure,
    precision_facts,
    quality_row,
)
from shakespeare_data import prepare  # noqa: E402

from minigpt.data.shards import open_shard  # noqa: E402
from minigpt.flops import PEAK_FLOPS_ENV, model_flops_utilization  # noqa: E402
from minigpt.metrics import token_byte_lengths  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402


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


def test_mfu_is_never_above_one_even_when_the_peak_is_measured_too_low():
    assert model_flops_utilization(5e8, 1e9) == pytest.approx(0.5)
    assert model_flops_utilization(8e9, 0.9e9) == 1.0, "a peak below the achieved rate is wrong: cap, not 889%"
    with pytest.raises(ValueError, match="positive"):
        model_flops_utilization(1e9, 0.0)


def test_throughput_bench_caps_mfu_and_marks_the_cap(monkeypatch):
    from throughput import measure

    monkeypatch.setenv(PEAK_FLOPS_ENV, "1")  # a 1 FLOP/s "peak": every step beats it
    result = measure("fp32", steps=2, warmup=1)
    assert result.mfu == 1.0
    assert "capped" in mfu_figure(result.mfu) and "capped" not in mfu_figure(0.283)


def test_quality_reads_what_auto_chose_from_the_training_log():
    log = ("[minigpt] device cpu (requested with --device)\n"
           "[minigpt] precision fp32 (auto: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the CPU's avx512_bf16 "
           "instructions; override with --precision)\n"
           "--compile auto: eager (--max-time 122s is under 600 s)\n")
    decisions = run_decisions(log)
    assert decisions["precision"] == "fp32"
    assert decisions["precision_why"].startswith("auto: ONEDNN_MAX_CPU_ISA=AVX2")
    assert decisions["compile_decision"].startswith("eager")
    assert run_decisions("") == {"precision": "", "precision_why": "", "compile_decision": ""}


def quality_result(val_bpb: float, wall_seconds: float, precision: str) -> QualityResult:
    return QualityResult(val_bpb=val_bpb, wall_seconds=wall_seconds, steps=640, tokens_seen=1_310_720,
                         tokens_per_sec=11_000.0, tokenizer_seconds=0.2, pretokenize_seconds=0.4, vocab_size=1024,
                         bytes_per_token=2.21, parameters=1_404_320, precision=precision)


def test_each_machine_class_is_judged_against_its_own_quality_goal():
    result = quality_result((NATIVE_BF16_GOAL_BPB + AVX2_ONLY_GOAL_BPB) / 2, 121.0, "fp32")
    native, avx2 = quality_row("this CPU", result, True, 125), quality_row("AVX2", result, False, 125)
    assert native.status == "FAIL" and f"<= {NATIVE_BF16_GOAL_BPB:.3f}" in native.goal
    assert avx2.status == "pass" and f"<= {AVX2_ONLY_GOAL_BPB:.3f}" in avx2.goal
    assert "640 steps" in avx2.figure and "fp32" in avx2.figure
    assert quality_row("AVX2", quality_result(2.3, 126.0, "fp32"), False, 125).status == "FAIL", "over budget"


def test_avx2_emulation_runs_only_on_an_x86_cpu_whose_auto_picks_bf16():
    facts = {"architecture": "x86", "auto_precision": "bf16"}
    assert emulation_skipped_reason(facts) == ""
    assert "AVX2-only case" in emulation_skipped_reason({**facts, "auto_precision": "fp32"})
    assert "x86" in emulation_skipped_reason({**facts, "architecture": "arm"})


def test_precision_facts_name_the_flags_the_isa_cap_and_autos_choice():
    facts = {"architecture": "x86", "cpu_flags": {"avx512f": True, "avx512_bf16": False, "amx_bf16": False},
             "onednn_max_cpu_isa": "", "native_bf16": False, "auto_precision": "fp32",
             "auto_why": "auto: this CPU has no avx512_bf16 or amx_bf16"}
    line = format_precision_facts(facts)
    assert "avx512f present, avx512_bf16 absent, amx_bf16 absent" in line
    assert "ONEDNN_MAX_CPU_ISA unset" in line and "--precision auto -> fp32 (auto: this CPU" in line
    here = precision_facts()
    assert here["auto_precision"] in ("fp32", "bf16") and here["auto_why"].startswith("auto: ")


@pytest.mark.integration
def test_run_all_quick_writes_results_and_plot(tmp_path):
    if not (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt").is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    result = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(tmp_path),
                             "--skip", "deepspeed", "compile", "memory", "data", "activation", "pretokenize", "lora"], capture_output=True, text=True, timeout=600)
    assert "| goal" in result.stdout, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["name"].split(":")[0] for row in results["rows"]} >= {"quality", "quality (Chinese)", "throughput",
                                                                       "decode"}
    assert len(results["quality"]["curve"]) >= 2
    baseline = results["quality_zh"]["char_level_baseline"]
    assert baseline["steps"] >= 1 and 0 < baseline["val_bpb"] < 10
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


def test_zh_classics_holds_out_whole_documents_every_twentieth(tmp_path):
    from zh_classics_data import SEPARATOR, split_documents

    corpus = tmp_path / "zh.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"诗{i}\n第{i}行。"}, ensure_ascii=False) + "\n"
                              for i in range(60)), encoding="utf-8")
    train, val = split_documents(corpus)
    assert val.split(SEPARATOR)[:-1] == ["诗0\n第0行。", "诗20\n第20行。", "诗40\n第40行。"]
    assert len(train.split(SEPARATOR)[:-1]) == 57 and "诗20\n" not in train


def test_the_char_level_baseline_learns_a_repeated_poem():
    from reference_gpt import train_char_level

    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n\n" * 200
    result = train_char_level(poem, poem[:400], seconds=120, max_steps=120, width=32, layers=1, heads=2,
                              context=32, warmup=1, lr=3e-3)
    uniform = math.log2(result.vocab_size) * len(poem[:400]) / len(poem[:400].encode())
    assert result.steps == 120 and result.val_bpb < 0.5 * uniform


def test_serve_load_reports_every_request_lost_instead_of_crashing(capsys):
    """No server answers: every request is lost, the table prints "-" for latencies, the exit code says so."""
    import serve_load
    from ports import free_port

    code = serve_load.main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "2", "--clients", "1",
                            "--sampling", "greedy", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert code == 1 and "LOST (greedy)" in err
    assert out.splitlines()[-1].split()[5:9] == ["-", "-", "-", "-"]


def test_sft_packing_bench_reports_both_variants_over_the_same_conversations(tmp_path):
    from sft_packing import compare

    padded, packed = compare(tmp_path, steps=2, batch_size=2, seq_len=128, count=120)
    assert padded.conversations == packed.conversations and packed.sequences < padded.sequences
    assert packed.padding_share < padded.padding_share
    assert all(r.useful_tokens_per_sec > 0 and math.isfinite(r.val_loss) for r in (padded, packed))


def test_lora_bench_compares_both_variants_in_their_own_processes():
    pytest.importorskip("peft", reason="the LoRA bench needs the peft package (the lora extra)")
    from lora import compare, table

    result = compare("tiny", rank=4, seq_len=32, batch=2, steps=1, repeats=1)
    full, lora = result["full"], result["lora"]
    assert full["trainable_params"] == full["total_params"] == lora["total_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    assert lora["optimizer_state_mb"] < full["optimizer_state_mb"] / 10
    assert "LoRA/full" in table(result) and all(r["step_s"] > 0 for r in (full, lora))


def test_pretokenize_bench_compares_a_worker_with_sp_encode_and_times_workers_on_a_cut_of_the_input(
        tmp_path, data_tokenizer, chinese_jsonl, demo_corpus, capsys):
    import pretokenize

    result = pretokenize.per_worker(chinese_jsonl, data_tokenizer, rounds=3)
    assert result["rounds"] == 3 and result["documents"] > 0
    assert all(result[key] > 0 for key in ("cpu_ratio", "wall_ratio", "baseline_cpu", "worker_cpu"))
    pretokenize.print_per_worker(result)
    assert "per worker vs sp.encode" in capsys.readouterr().out
    big = tmp_path / "big.txt"
    big.write_bytes(demo_corpus.read_bytes())
    assert pretokenize.scaling(big, tmp_path / "work", 1, 600, "text", [1, 2], 2) == 0
    out = capsys.readouterr().out
    assert "2 workers vs 1: median speedup" in out and not (tmp_path / "work" / "scaling-shards").exists()
