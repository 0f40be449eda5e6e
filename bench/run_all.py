"""Run every performance goal of MiniGPT and print one table (figure, ratio, goal, pass/fail).

    python bench/run_all.py                   # everything (~15 min on 2 CPU cores, 4 deepspeed launches)
    python bench/run_all.py --skip deepspeed  # sections: quality quality_zh throughput compile deepspeed
                                              #   decode data activation pretokenize memory sft_packing lora
    python bench/run_all.py --quick           # tiny sizes: checks the plumbing, the figures mean nothing

Writes `bench/out/results.json` (every figure, the machine, the load average before each section)
and `bench/out/quality_curve.png` (val bits/byte against wall time; drawn without matplotlib by
`bench/pngplot.py`). Ratios compare with a baseline measured in the same run where one can be
(reference_gpt.py for throughput, the plain engine for DeepSpeed, no-cache for decoding), because this
machine is shared and noisy; the quality baseline is a fixed figure (`quality.BASELINE_BPB`, 2.72 bpb in 125 s).

CPUs come in two classes for training precision: with native bf16 (avx512_bf16 / amx_bf16, Arm bf16) and
without (AVX2-only), where bf16 autocast is emulated and ~8x slower than fp32. The run prints the CPU flags
that decide it, the ONEDNN_MAX_CPU_ISA in force and what `--precision auto` chose; on a CPU with native bf16
the quality recipe also runs under ONEDNN_MAX_CPU_ISA=AVX2, which makes oneDNN take the AVX2-only path, so
one run reports both classes against their own goals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning thread that
# waits for a core another process holds makes every op ~40x slower (measured: 62 ms vs > 270 ms per
# step of the baseline shape with one other busy process). Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from minigpt.engine.device import choose_precision, cpu_flags, native_cpu_bf16  # noqa: E402

if TYPE_CHECKING:
    from quality import QualityResult

REPO = Path(__file__).resolve().parents[1]
NATIVE_BF16_GOAL_BPB = 2.239
"""val bits/byte the recipe must reach within its budget on a CPU with native bf16 (auto trains in bf16):
no worse than the recipe gave when it forced bf16."""
AVX2_ONLY_GOAL_BPB = 2.40
"""val bits/byte the recipe must reach within its budget on a CPU without native bf16 (auto trains in fp32)."""
AVX2_EMULATION = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Caps oneDNN at AVX2: on a CPU with native bf16 it runs bf16 as an AVX2-only CPU does, and auto picks fp32."""
PRECISION_FLAGS = {"x86": ("avx512f", "avx512_bf16", "amx_bf16"), "arm": ("bf16",)}
"""The CPU flags that decide how fast bf16 runs, per architecture."""
SECTIONS = ("quality", "quality_zh", "throughput", "compile", "deepspeed", "decode", "data", "activation", "pretokenize", "memory",
            "sft_packing", "lora")


@dataclass
class Row:
    """One line of the results table."""

    name: str
    figure: str
    ratio: str
    goal: str
    status: str
    """"pass", "FAIL" or "info" (reported, no goal)."""


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_architecture(machine_name: str = "") -> str:
    """"x86", "arm" or the raw machine name (default: this one's): which CPU flags say whether bf16 is native."""
    machine_name = (machine_name or platform.machine()).lower()
    if machine_name in ("x86_64", "amd64", "i386", "i686"):
        return "x86"
    return "arm" if machine_name in ("aarch64", "arm64") else machine_name


def precision_facts() -> dict:
    """What decides the speed of bf16 here: the CPU's flags (present/absent, None where unreadable), the
    ONEDNN_MAX_CPU_ISA in force, whether bf16 is native, and what `--precision auto` chose and why."""
    flags = cpu_flags()
    architecture = cpu_architecture()
    native, _ = native_cpu_bf16(flags, platform.machine().lower())
    choice = choose_precision("auto", torch.device("cpu"))
    return {"architecture": architecture,
            "cpu_flags": {name: None if flags is None else name in flags for name in PRECISION_FLAGS.get(architecture, ())},
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "native_bf16": native, "auto_precision": choice.precision, "auto_why": choice.why}


def format_precision_facts(facts: dict) -> str:
    """One line for the console: `avx512_bf16 present, ...; ONEDNN_MAX_CPU_ISA unset; --precision auto -> ...`."""
    state = {True: "present", False: "absent", None: "unknown"}
    flags = ", ".join(f"{name} {state[present]}" for name, present in facts["cpu_flags"].items()) or "none known"
    return (f"CPU flags: {flags}; ONEDNN_MAX_CPU_ISA {facts['onednn_max_cpu_isa'] or 'unset'}; "
            f"--precision auto -> {facts['auto_precision']} ({facts['auto_why']})")


def quality_goal(native_bf16: bool) -> float:
    """The val bits/byte goal of the machine class: native bf16 or AVX2-only."""
    return NATIVE_BF16_GOAL_BPB if native_bf16 else AVX2_ONLY_GOAL_BPB


def in_native_bf16_class(facts: dict) -> bool:
    """Whether this CPU, as configured, is of the native-bf16 class: the one where auto trains in bf16."""
    return facts["auto_precision"] == "bf16"


def quality_row(label: str, result: QualityResult, native_bf16: bool, budget: float) -> Row:
    """The goal row of one recipe run: bits/byte, wall time, steps and the precision auto chose."""
    from quality import BASELINE_BPB

    goal = quality_goal(native_bf16)
    ok = result.val_bpb <= goal and result.wall_seconds <= budget
    machine_class = "native bf16" if native_bf16 else "AVX2-only"
    return Row(f"quality: {label}, val bits/byte (whole val text)",
               f"{result.val_bpb:.3f} bpb in {result.wall_seconds:.1f} s, {result.steps} steps, {result.precision}",
               f"{result.val_bpb / BASELINE_BPB:.3f}x of {BASELINE_BPB}",
               f"<= {goal:.3f} within {budget} s ({machine_class})", verdict(ok))


def speed_row(label: str, result: QualityResult) -> Row:
    """Tokens and bytes per second of one recipe run, with what auto chose for precision and compilation."""
    compiled = result.compile_decision.split(" ", 1)[0] or "not auto"
    return Row(f"quality: training speed, {label}", f"{result.tokens_per_sec:,.0f} tok/s = "
               f"{result.tokens_per_sec * result.bytes_per_token:,.0f} bytes/s ({result.precision}, {compiled})",
               "", "", "info")


def emulation_skipped_reason(facts: dict) -> str:
    """Why the AVX2-only emulation does not run here, or "" when it does (x86 with native bf16 in force)."""
    if facts["architecture"] != "x86":
        return f"ONEDNN_MAX_CPU_ISA=AVX2 emulates an x86 CPU; this one is {facts['architecture']}"
    if not in_native_bf16_class(facts):
        return "this CPU runs no native bf16 (flags or ONEDNN_MAX_CPU_ISA), so the row above is the AVX2-only case"
    return ""


def quality_chart(work: Path, native: QualityResult, emulated: QualityResult | None, budget: float) -> Path:
    """The learning curves of both machine classes against wall time, with both goals and the budget."""
    from pngplot import BLUE, GREEN, GREY, ORANGE, RED, Chart, Series
    from quality import BASELINE_BPB

    series = [Series(f"THIS CPU {native.precision.upper()} ({native.val_bpb:.2f} AT {native.wall_seconds:.0f} S)",
                     native.curve, BLUE)]
    if emulated is not None:
        series.append(Series(f"AVX2 CAP {emulated.precision.upper()} ({emulated.val_bpb:.2f} AT "
                             f"{emulated.wall_seconds:.0f} S)", emulated.curve, ORANGE))
    series.append(Series(f"BASELINE ({BASELINE_BPB} AT {budget} S)", [(budget, BASELINE_BPB)], RED))
    chart = Chart("VAL BITS/BYTE VS WALL TIME - TINYSHAKESPEARE, LAST 10%", "WALL TIME OF THE TRAINING PROCESS (S)",
                  "VAL BPB", y_max=BASELINE_BPB + 1.5, series=series,
                  hlines=[(NATIVE_BF16_GOAL_BPB, f"GOAL BF16 CPU {NATIVE_BF16_GOAL_BPB:.3f}", GREEN),
                          (AVX2_ONLY_GOAL_BPB, f"GOAL AVX2 CPU {AVX2_ONLY_GOAL_BPB:.3f}", GREEN)],
                  vlines=[(budget, f"{budget} S BUDGET", GREY)])
    return chart.save(work / "quality_curve.png")


def print_now(message: str) -> None:
    """Progress lines of the long sections, shown as they come."""
    print(message, flush=True)


def quality_rows(work: Path, quick: bool, results: dict, facts: dict) -> list[Row]:
    """The recipe as shipped on this CPU and, where this CPU has native bf16, under the AVX2-only emulation."""
    from quality import DEFAULT_RECIPE, load_recipe, run_quality

    overrides = {"max_steps": 20, "save_interval": 10, "warmup_steps": 5} if quick else {}
    budget = load_recipe(DEFAULT_RECIPE)["time_budget_s"]
    native = run_quality(work / "quality", overrides=overrides, log=print_now)
    results["quality"] = asdict(native)
    native_bf16 = in_native_bf16_class(facts)
    native_label = "this CPU" + ("" if native_bf16 else " (no native bf16: the AVX2-only case)")
    rows = [quality_row(native_label, native, native_bf16, budget)]
    emulated, skipped = None, emulation_skipped_reason(facts)
    if skipped:
        rows.append(Row("quality: emulated AVX2-only CPU", f"not run: {skipped}", "", "", "info"))
    else:
        emulated = run_quality(work / "quality_avx2", overrides=overrides, log=print_now, env=AVX2_EMULATION)
        results["quality_avx2"] = asdict(emulated)
        rows.append(quality_row("ONEDNN_MAX_CPU_ISA=AVX2 (emulated AVX2-only CPU)", emulated, False, budget))
    print(f"quality: learning curves written to {quality_chart(work, native, emulated, budget)}", flush=True)
    rows.append(speed_row("this CPU", native))
    if emulated is not None:
        rows.append(speed_row("AVX2 emulated", emulated))
    rows.append(Row("quality: tokenizer + pre-tokenization (not timed)",
                    f"{native.tokenizer_seconds:.1f} s + {native.pretokenize_seconds:.1f} s", "", "", "info"))
    return rows


def chinese_quality_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    """The Chinese recipe against the minimal GPT trainer's character-level recipe, same text, same wall time."""
    from quality import CHINESE_RECIPE, load_recipe, run_quality
    from reference_gpt import train_char_level
    from zh_classics_data import split_documents

    recipe = load_recipe(CHINESE_RECIPE)
    limit = 600 if quick else None
    overrides = {"max_steps": 20, "save_interval": 10, "warmup_steps": 5, "max_time": ""} if quick else {}
    ours = run_quality(work / "quality_zh", CHINESE_RECIPE, overrides=overrides, log=print_now, limit=limit)
    seconds = 5.0 if quick else ours.wall_seconds  # the baseline gets all of our wall time for training alone
    train_text, val_text = split_documents(limit=limit)
    baseline = train_char_level(train_text, val_text, seconds)
    results["quality_zh"] = {"minigpt": asdict(ours), "char_level_baseline": asdict(baseline)}
    budget = recipe["time_budget_s"]
    ok = ours.val_bpb < baseline.val_bpb and ours.wall_seconds <= budget
    lines = [line for line in ours.sample.splitlines()[1:] if line.strip()]
    return [
        Row("quality (Chinese): zh_classics held-out bits/byte",
            f"{ours.val_bpb:.3f} bpb in {ours.wall_seconds:.1f} s, {ours.steps} steps, {ours.precision}",
            f"{ours.val_bpb / baseline.val_bpb:.3f}x of {baseline.val_bpb:.3f}",
            f"< char-level baseline, within {budget} s", verdict(ok)),
        Row("quality (Chinese): minimal GPT trainer, character level, same text and wall time",
            f"{baseline.val_bpb:.3f} bpb, {baseline.steps} steps in {baseline.train_seconds:.1f} s, "
            f"{baseline.parameters:,} parameters", "", "", "info"),
        Row("quality (Chinese): sample after the title of a held-out poem",
            f"{len(lines)} lines: " + " / ".join(line[:24] for line in lines[:3]), "", "", "info"),
    ]


def throughput_rows(quick: bool, compile_too: bool, results: dict, auto_precision: str) -> list[Row]:
    from throughput import BASELINE_TOKENS_PER_SEC, compare_with_reference, measure

    rows = []
    for shape in ("baseline",) if quick else ("baseline", "small"):
        c = compare_with_reference(shape, rounds=2 if quick else 8, steps=2 if quick else (6 if shape == "baseline" else 2))
        results.setdefault("reference_comparison", []).append({**asdict(c), "ratio": c.ratio})
        label = ("baseline shape (0.8M, 12x64)" if shape == "baseline" else
                 f"small preset shape ({c.parameters / 1e6:.0f}M, 8x256)")
        rows.append(Row(f"throughput: {label}, fp32 eager vs reference loop", f"{c.tokens_per_sec:,.0f} tok/s "
                        f"(ref {c.reference_tokens_per_sec:,.0f})", f"{c.ratio:.2f}x ref", ">= 1.00x ref",
                        verdict(c.ratio >= 1.0)))
    steps = 5 if quick else 60
    variants = [("fp32", False), ("bf16", False)] + ([("fp32", True), ("bf16", True)] if compile_too else [])
    measured = {}
    for precision, compiled in variants:
        r = measure(precision, compiled, steps)
        measured[(precision, compiled)] = r
        results.setdefault("throughput", []).append(asdict(r))
        label = (f"throughput: plain engine {precision}{', torch.compile' if compiled else ''} (explicit"
                 f"{'; what auto picks here' if precision == auto_precision else ''})")
        figure = f"{r.tokens_per_sec:,.0f} tok/s, MFU {mfu_figure(r.mfu)} of {r.peak_flops / 1e9:.0f} GFLOP/s"
        ratio = f"{r.tokens_per_sec / BASELINE_TOKENS_PER_SEC:.2f}x of 12.8k"
        if compiled:
            eager = measured[(precision, False)]
            ratio = f"{r.tokens_per_sec / eager.tokens_per_sec:.2f}x eager; compile {r.warmup_seconds:.0f} s"
            auto = "auto: eager (bf16 on a CPU)" if precision == "bf16" else "auto: compiled from 2000 steps"
            rows.append(Row(label, figure, ratio, auto, "info"))
        else:
            rows.append(Row(label, figure, ratio, "", "info"))
    rows.append(spinning_threads_row(steps, results))
    return rows


def mfu_figure(mfu: float) -> str:
    """MFU as a percentage, marked when it is the 100% cap (the measured peak fell below the achieved rate)."""
    return f"{mfu:.1%}" + (" (capped: peak measured too low)" if mfu >= 1.0 else "")


def spinning_threads_row(steps: int, results: dict) -> Row:
    """fp32 eager and the reference under OpenMP's default spin-waiting, in a fresh process (the policy is
    read once, when torch starts its thread pool): faster on a quiet machine, far slower on a busy one."""
    from throughput import BASELINE_TOKENS_PER_SEC

    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    command = [sys.executable, str(REPO / "bench" / "throughput.py"), "--json", "--reference", "--steps", str(steps)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    spinning = json.loads(output.strip().splitlines()[-1])
    results["throughput_omp_active"] = spinning
    ours, reference = spinning["fp32_tokens_per_sec"], spinning["reference_tokens_per_sec"]
    return Row("throughput: plain engine fp32, OMP_WAIT_POLICY=ACTIVE", f"{ours:,.0f} tok/s (ref {reference:,.0f})",
               f"{ours / BASELINE_TOKENS_PER_SEC:.2f}x of 12.8k; {ours / reference:.2f}x ref", "reported", "info")


def deepspeed_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    from ds_overhead import measure_all
    from shakespeare_data import prepare

    prepared = prepare(work / "ds" / "shakespeare", 1024)
    timings = measure_all(work / "ds", prepared.dataset_dir, prepared.tokenizer_dir, steps=12 if quick else 40,
                          stages=(2,) if quick else (1, 2, 3), log=lambda m: print(m, flush=True))
    results["deepspeed"] = [asdict(t) for t in timings]
    plain, one_rank, *two_ranks = timings
    ratio = one_rank.step_ms / plain.step_ms
    rows = [Row("deepspeed: plain engine step (shakespeare, 16x128)", f"{plain.step_ms:.1f} ms/step", "", "", "info"),
            Row("deepspeed: 1 rank ZeRO-0 step", f"{one_rank.step_ms:.1f} ms/step", f"{ratio:.2f}x plain",
                "<= 1.15x plain", verdict(ratio <= 1.15))]
    for t in two_ranks:
        rows.append(Row(f"deepspeed: {t.label.removeprefix('deepspeed ')}", f"{t.step_ms:.1f} ms/step "
                        f"({t.tokens_per_sec:,.0f} tok/s)", f"{t.step_ms / plain.step_ms:.2f}x plain", "reported", "info"))
    return rows


def decode_rows(quick: bool, results: dict) -> list[Row]:
    from decode import batched_rate, time_decode

    from minigpt.config import get_config
    from minigpt.generate import GenerationConfig, TextGenerator
    from minigpt.model import MiniGPT

    preset, new_tokens = ("tiny", 16) if quick else ("small", 256)
    torch.manual_seed(0)
    config = get_config(preset)
    generator = TextGenerator(MiniGPT(config), tokenizer=None, device="cpu")
    prompt = torch.randint(4, config.vocab_size, (8,)).tolist()
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=())
    rates = {}
    for use_cache in (True, False):
        seconds, produced = time_decode(generator, prompt, generation, use_cache, repeats=1)
        rates[use_cache] = produced / seconds
    batched = {batch: batched_rate(generator, config.vocab_size, batch, 8, new_tokens)
               for batch in ((1, 4) if quick else (1, 8, 32))}
    results["decode"] = {"preset": preset, "new_tokens": new_tokens, "cache_tokens_per_sec": rates[True],
                         "no_cache_tokens_per_sec": rates[False], "batched_tokens_per_sec": batched}
    speedup = rates[True] / rates[False]
    rows = [Row(f"decode: {preset}, KV cache, {new_tokens} new tokens", f"{rates[True]:,.1f} tok/s "
                f"(no cache {rates[False]:,.1f})", f"{speedup:.2f}x no-cache", ">= 10x no-cache",
                verdict(speedup >= 10.0))]
    for batch, rate in batched.items():
        rows.append(Row(f"decode: {preset}, batch {batch}, KV cache", f"{rate:,.0f} tok/s in all rows",
                        f"{rate / batched[1]:.2f}x batch 1", "reported", "info"))
    return rows


def data_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    from data_wait import measure as measure_wait
    from shakespeare_data import prepare

    prepared = prepare(work / "data_wait" / "shakespeare", 1024)
    preset, steps = ("tiny", 6) if quick else ("small", 16)
    waits = [measure_wait(work / "data_wait", prepared.dataset_dir, prepared.tokenizer_dir, prefetch, preset, steps)
             for prefetch in (0, 2)]
    results["data_wait"] = [asdict(w) for w in waits]
    return [Row(f"data: {preset}, share of step time waiting for data, --prefetch {w.prefetch}",
                f"{w.share:.3%} ({w.wait_ms:.2f} of {w.step_ms:.0f} ms)", "", "reported", "info") for w in waits]


def activation_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    import activation_memory

    out = work / "activation_memory.json"
    preset, seq_len, batch = ("tiny", 128, 2) if quick else ("small", 1024, 4)
    activation_memory.main(["--preset", preset, "--seq-len", str(seq_len), "--batch-size", str(batch), "--json", str(out)])
    measured = json.loads(out.read_text())
    results["activation_checkpointing"] = measured
    off, on = measured["results"]["off"], measured["results"]["on"]
    saved, slowdown = measured["memory_saved"], measured["slowdown"]
    return [Row(f"memory: {preset}, context {seq_len}, peak activations with --activation-checkpointing",
                f"{off['peak_activation_mib']:,.0f} -> {on['peak_activation_mib']:,.0f} MiB, step x{slowdown:.2f}",
                f"{saved:.0%} less", ">= 40% less at <= 1.35x", verdict(saved >= 0.40 and slowdown <= 1.35))]


def pretokenize_rows(quick: bool, results: dict) -> list[Row]:
    from pretokenize import DEFAULT_INPUT, compare

    if not DEFAULT_INPUT.is_file():
        return [Row("pretokenize: zh_classics.jsonl", "skipped: ../shared/data/zh_classics.jsonl missing", "", "",
                    "info")]
    megabytes, vocab, measured, worker = compare(DEFAULT_INPUT, "text", 2000 if quick else 8000, [1, 2],
                                                 1 if quick else 3, 3 if quick else 7)
    results["pretokenize"] = {"megabytes": megabytes, "vocab": vocab, "rows": measured, "per_worker": worker}
    (_, base_s, base_cpu, base_tokens), (_, one_s, one_cpu, one_tokens), (_, two_s, _, _) = measured
    whole = (one_tokens / one_s) / (base_tokens / base_s)
    return [Row(f"pretokenize: zh_classics ({megabytes:.0f} MB, vocab {vocab}), per worker vs sp.encode "
                f"(median of {worker['rounds']} alternating rounds)",
                f"{worker['worker_cpu']:.2f} vs {worker['baseline_cpu']:.2f} CPU s (wall {worker['wall_ratio']:.2f}x)",
                f"{worker['cpu_ratio']:.2f}x", ">= 0.90x", verdict(worker["cpu_ratio"] >= 0.90)),
            Row("pretokenize: whole build, 1 worker vs sp.encode (reading, split, writes, fsyncs included)",
                f"{one_tokens / one_s / 1e6:.2f} vs {base_tokens / base_s / 1e6:.2f} Mtok/s (cpu "
                f"{base_cpu / one_cpu:.2f}x)", f"{whole:.2f}x", "reported", "info"),
            Row("pretokenize: --workers 2 vs 1 on 12 MB (runs in-process below 64 MB: never slower)",
                f"{one_s:.2f} s -> {two_s:.2f} s", f"{one_s / two_s:.2f}x", "reported", "info")]


def memory_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    from loader_memory import measure

    small, large = (1, 5) if quick else (10, 200)
    batches = 300 if quick else 3000
    low, high = measure(small, batches, scratch=work), measure(large, batches, scratch=work)
    results["memory"] = [asdict(low), asdict(high)]
    ratio = high.anon_end_mib / low.anon_end_mib
    return [Row(f"memory: loader RssAnon, {small}M -> {large}M tokens", f"{low.anon_end_mib:.0f} -> "
                f"{high.anon_end_mib:.0f} MiB", f"{ratio:.3f}x", "flat (<= 1.10x)", verdict(ratio <= 1.10)),
            Row("memory: loader RSS incl. touched file pages", f"{low.rss_end_mib:.0f} -> {high.rss_end_mib:.0f} MiB "
                f"({batches} batches)", f"{high.rss_end_mib / low.rss_end_mib:.3f}x", "", "info")]


def format_table(rows: list[Row]) -> str:
    """A markdown table of the rows (readable in a terminal too)."""
    header = ("goal", "figure", "ratio", "target", "result")
    cells = [header] + [(r.name, r.figure, r.ratio, r.goal, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sft_packing_rows(work: Path, quick: bool, results: dict) -> list[Row]:
    import sft_packing

    out = work / "sft_packing.json"
    sft_packing.main(["--json", str(out)] + (["--quick"] if quick else []))
    measured = json.loads(out.read_text())
    results["sft_packing"] = measured
    padded, packed = measured["results"]
    speedup = measured["speedup"]
    return [Row("sft: --pack vs padded, useful (assistant) tokens/s, same steps, mixed-length chats",
                f"{padded['useful_tokens_per_sec']:,.0f} -> {packed['useful_tokens_per_sec']:,.0f} tok/s, val loss "
                f"{padded['val_loss']:.3f} -> {packed['val_loss']:.3f}", f"{speedup:.2f}x",
                f">= {sft_packing.GOAL_SPEEDUP:.1f}x at <= val loss", verdict(measured["pass"]))]


def lora_rows(quick: bool, results: dict) -> list[Row]:
    """LoRA rank 8 against full fine-tuning at the small preset (bench/lora.py): reported, no goal."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return [Row("lora: rank 8 vs full fine-tuning", "skipped: peft not installed (the lora extra)", "-", "-",
                    "info")]
    import lora

    measured = (lora.compare("tiny", 8, 64, 2, 2, 1) if quick else lora.compare("small", 8, 256, 8, 12, 2))
    results["lora"] = measured
    full, adapted = measured["full"], measured["lora"]
    return [Row(f"lora: rank 8 vs full fine-tuning, {measured['settings']['config']} preset, trainable parameters",
                f"{full['trainable_params']:,.0f} -> {adapted['trainable_params']:,.0f}",
                f"{adapted['trainable_params'] / full['trainable_params']:.3f}x", "report", "info"),
            Row("lora: peak RSS (each variant in its own process; LoRA imports peft)",
                f"{full['peak_rss_mb']:.0f} -> {adapted['peak_rss_mb']:.0f} MB",
                f"{adapted['peak_rss_mb'] / full['peak_rss_mb']:.2f}x", "report", "info"),
            Row("lora: step time (fp32, plain engine)", f"{full['step_s']:.3f} -> {adapted['step_s']:.3f} s",
                f"{adapted['step_s'] / full['step_s']:.2f}x", "report", "info")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: plumbing check, figures meaningless")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = precision_facts()
    results: dict = {"machine": machine(), "quick": args.quick, "load_average": {}, "precision": facts}
    print(format_precision_facts(facts), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    sections = [s for s in SECTIONS if s not in args.skip]
    for section in sections:
        results["load_average"][section] = load_average()
        print(f"== {section} (load average {results['load_average'][section]:.2f})", flush=True)
        if section == "quality":
            rows += quality_rows(args.out, args.quick, results, facts)
        elif section == "quality_zh":
            rows += chinese_quality_rows(args.out, args.quick, results)
        elif section == "throughput":
            rows += throughput_rows(args.quick, "compile" in sections and not args.quick, results,
                                    facts["auto_precision"])
        elif section == "deepspeed":
            rows += deepspeed_rows(args.out, args.quick, results)
        elif section == "decode":
            rows += decode_rows(args.quick, results)
        elif section == "data":
            rows += data_rows(args.out, args.quick, results)
        elif section == "activation":
            rows += activation_rows(args.out, args.quick, results)
        elif section == "pretokenize":
            rows += pretokenize_rows(args.quick, results)
        elif section == "memory":
            rows += memory_rows(args.out, args.quick, results)
        elif section == "sft_packing":
            rows += sft_packing_rows(args.out, args.quick, results)
        elif section == "lora":
            rows += lora_rows(args.quick, results)
    results["rows"] = [asdict(r) for r in rows]
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nmachine: {results['machine']}")
    print(format_precision_facts(facts))
    print("load average before each section: " + ", ".join(f"{k} {v:.2f}" for k, v in results["load_average"].items()))
    print(format_table(rows))
    failed = [r.name for r in rows if r.status == "FAIL"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows pass or report; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
