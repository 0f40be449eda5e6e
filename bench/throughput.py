"""Plain-engine training throughput and MFU on the baseline's model shape, fp32 / bf16, eager / compiled.

    python bench/throughput.py                    # 4 layers, 4 heads, width 128, context 64, batch 12
    python bench/throughput.py --steps 100 --compile
    python bench/throughput.py --json --reference   # one JSON line: fp32 eager and the reference loop

The shape is the minimal GPT trainer's CPU recipe (~0.8M parameters; vocab 65 as its character
tokenizer). Each variant runs full optimizer steps through `PlainEngine` (autocast, clipping, AdamW,
schedule) on random token batches; tokens/s is the median step's. MFU is model FLOPs
(`MiniGPTConfig.flops_per_token`) against the device peak `minigpt.flops.peak_flops` measures, capped at
100% by `minigpt.flops.model_flops_utilization` as in training. The precision of each row is explicit
(fp32 and bf16 side by side); what `--precision auto` would pick on this CPU is printed above the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minigpt.config import MiniGPTConfig, TrainConfig  # noqa: E402
from minigpt.engine.device import choose_precision  # noqa: E402
from minigpt.engine.plain import PlainEngine  # noqa: E402
from minigpt.flops import model_flops_utilization, peak_flops  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402

BASELINE_SHAPE = MiniGPTConfig(vocab_size=65, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                               ffn_hidden_size=352, max_seq_len=64)
"""4 layers, 4 heads, width 128, context 64; SwiGLU 352 has the parameters of a 4x GELU MLP."""
BASELINE_BATCH = 12
BASELINE_TOKENS_PER_SEC = 12_800.0


@dataclass
class ThroughputResult:
    """One variant's steady-state speed."""

    precision: str
    compiled: bool
    tokens_per_sec: float
    step_ms: float
    mfu: float
    peak_flops: float
    warmup_seconds: float
    """Time of the first steps (includes compilation when compiled)."""


def measure(precision: str = "fp32", compiled: bool = False, steps: int = 60, warmup: int = 5,
            config: MiniGPTConfig = BASELINE_SHAPE, batch_size: int = BASELINE_BATCH) -> ThroughputResult:
    """Median-step tokens/s of full training steps through PlainEngine."""
    torch.manual_seed(0)
    seq_len = config.max_seq_len
    cfg = TrainConfig.of(batch_size=batch_size, precision=precision, compile="on" if compiled else "off", max_steps=10 * steps,
                      warmup_steps=warmup)
    engine = PlainEngine(MiniGPT(config), cfg, torch.device("cpu"))
    batches = torch.randint(4, config.vocab_size, (8, batch_size, seq_len + 1))

    def step(i: int) -> float:
        start = time.perf_counter()
        batch = batches[i % len(batches)]
        logits = engine(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start

    warmup_seconds = sum(step(i) for i in range(warmup))
    median = statistics.median(step(i) for i in range(steps))
    tokens_per_sec = batch_size * seq_len / median
    peak, _ = peak_flops("cpu", precision)
    mfu = model_flops_utilization(config.flops_per_token(seq_len) * tokens_per_sec, peak)
    return ThroughputResult(precision, compiled, tokens_per_sec, median * 1e3, mfu, peak, warmup_seconds)


@dataclass
class Comparison:
    """MiniGPT's plain engine and the reference loop, timed in alternating blocks in one process."""

    shape: str
    parameters: int
    reference_parameters: int
    tokens_per_step: int
    tokens_per_sec: float
    reference_tokens_per_sec: float

    @property
    def ratio(self) -> float:
        return self.tokens_per_sec / self.reference_tokens_per_sec


def compare_with_reference(shape: str = "baseline", rounds: int = 8, steps: int = 6) -> Comparison:
    """fp32 eager tokens/s of the plain engine against the reference minimal-GPT loop at the same shape (width,
    depth, heads, context, vocabulary, batch): `rounds` alternating blocks of `steps` timed steps each, so a
    slow spell of a shared machine lands on both; the medians of all the steps are compared.

    shape: "baseline" (the minimal GPT trainer's CPU recipe) or "small" (the `small` preset, 26M parameters,
    context 256, batch 8)."""
    from reference_gpt import ReferenceGPT

    from minigpt.config import get_config

    if shape == "baseline":
        config, batch_size = BASELINE_SHAPE, BASELINE_BATCH
    else:
        config, batch_size = get_config("small", max_seq_len=256), 8
    seq_len = config.max_seq_len
    torch.manual_seed(0)
    cfg = TrainConfig.of(batch_size=batch_size, precision="fp32", compile="off", max_steps=100 * rounds * steps,
                      warmup_steps=5)
    engine = PlainEngine(MiniGPT(config), cfg, torch.device("cpu"))
    reference = ReferenceGPT(vocab=config.vocab_size, width=config.hidden_size, layers=config.num_layers,
                             heads=config.num_heads, context=seq_len)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    batch = torch.randint(4, config.vocab_size, (batch_size, seq_len + 1))

    def ours() -> float:
        start = time.perf_counter()
        logits = engine(batch[:, :-1])
        engine.backward(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()))
        engine.step()
        return time.perf_counter() - start

    def theirs() -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(reference(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: allocations, kernel choice
        ours(), theirs()
    mine, refs = [], []
    for _ in range(rounds):
        mine += [ours() for _ in range(steps)]
        refs += [theirs() for _ in range(steps)]
    tokens = batch_size * seq_len
    return Comparison(shape, config.num_params(), sum(p.numel() for p in reference.parameters()), tokens,
                      tokens / statistics.median(mine), tokens / statistics.median(refs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to start)")
    parser.add_argument("--json", action="store_true", help="print fp32 eager tokens/s as one JSON line")
    parser.add_argument("--reference", action="store_true",
                        help="with --json: also the reference minimal GPT loop (bench/reference_gpt.py)")
    args = parser.parse_args(argv)
    if args.json:  # run_all.py runs this in a subprocess to measure under another OpenMP policy
        from reference_gpt import reference_tokens_per_sec

        result = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                  "fp32_tokens_per_sec": measure("fp32", False, args.steps).tokens_per_sec}
        if args.reference:
            result["reference_tokens_per_sec"] = reference_tokens_per_sec(args.steps)
        print(json.dumps(result))
        return 0
    variants = [("fp32", False), ("bf16", False)] + ([("fp32", True), ("bf16", True)] if args.compile else [])
    print(f"baseline shape: {BASELINE_SHAPE.num_params():,} parameters, batch {BASELINE_BATCH} x "
          f"{BASELINE_SHAPE.max_seq_len}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    auto = choose_precision("auto", torch.device("cpu"))
    print(f"explicit precisions below; --precision auto picks {auto.precision} here ({auto.why})")
    print(f"{'precision':<9} {'compiled':<8} {'tokens/s':>9} {'ms/step':>8} {'MFU':>6} {'peak GFLOP/s':>12} "
          f"{'first steps s':>13}")
    for precision, compiled in variants:
        r = measure(precision, compiled, args.steps)
        print(f"{r.precision:<9} {str(r.compiled):<8} {r.tokens_per_sec:>9,.0f} {r.step_ms:>8.1f} {r.mfu:>6.1%} "
              f"{r.peak_flops / 1e9:>12.1f} {r.warmup_seconds:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
