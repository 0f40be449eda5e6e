"""Peak activation memory and step time of one training step, with and without --activation-checkpointing.

    python bench/activation_memory.py                      # `small` preset, context 1024, batch 4
    python bench/activation_memory.py --preset tiny --seq-len 256 --batch-size 8 --steps 2

Each configuration runs in a fresh process (so no freed-but-cached memory of another run is counted):
the model, its gradients and the AdamW moments are allocated first (one step on zero gradients), then
`--steps` real steps are timed. On CPU the activation peak is the process's peak resident memory
(ru_maxrss) minus its resident memory before the measured steps; on CUDA it is
`torch.cuda.max_memory_allocated` minus the memory allocated before them. Prints one table with the
ratios (goal: >= 40% less peak activation memory at <= 1.35x step time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(preset: str, seq_len: int, batch_size: int, steps: int, checkpointing: bool, device: str) -> dict:
    """One configuration, in this process."""
    import torch
    import torch.nn.functional as F

    from minigpt.config import TrainConfig, get_config
    from minigpt.engine.plain import PlainEngine
    from minigpt.model import MiniGPT

    torch.manual_seed(0)
    config = get_config(preset, max_seq_len=max(seq_len, get_config(preset).max_seq_len))
    # fp32 on every machine: under bf16 autocast (what --precision auto picks on a CPU with native bf16) the
    # saved activations are half the size, so checkpointing saves a smaller share (24% against 40% here).
    cfg = TrainConfig.of(batch_size=batch_size, max_steps=steps + 1, warmup_steps=0, precision="fp32",
                      activation_checkpointing=checkpointing)
    engine = PlainEngine(MiniGPT(config), cfg, torch.device(device))
    for param in engine.module.parameters():  # gradients and AdamW moments exist before the measurement
        param.grad = torch.zeros_like(param)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=False)
    rows = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    started = time.perf_counter()
    for _ in range(steps):
        logits = engine(rows[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"checkpointing": checkpointing, "peak_activation_mib": peak / 2**20,
            "step_seconds": (time.perf_counter() - started) / steps, "parameters": engine.module.num_params()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per mode (the lowest is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args(argv)
    if args.one:
        result = measure(args.preset, args.seq_len, args.batch_size, args.steps, args.one == "on", args.device)
        print(json.dumps(result))
        return 0
    results = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--device", args.device, "--one", mode]
        # Each mode in two fresh processes, the lower peak and step time kept: a process's peak RSS also holds
        # what the allocator has not returned yet, which now and then inflates one run by hundreds of MiB.
        runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
                           .stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
        results[mode] = {**runs[0], "peak_activation_mib": min(r["peak_activation_mib"] for r in runs),
                         "step_seconds": min(r["step_seconds"] for r in runs)}
    off, on = results["off"], results["on"]
    memory_saved = 1 - on["peak_activation_mib"] / off["peak_activation_mib"]
    slowdown = on["step_seconds"] / off["step_seconds"]
    print(f"{args.preset} ({off['parameters'] / 1e6:.1f}M parameters), context {args.seq_len}, batch {args.batch_size}, "
          f"{args.device}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'activation checkpointing':<26}{'peak activations':>18}{'step time':>12}")
    for mode in ("off", "on"):
        r = results[mode]
        print(f"{mode:<26}{r['peak_activation_mib']:>14,.0f} MiB{r['step_seconds']:>11.2f}s")
    ok = memory_saved >= 0.40 and slowdown <= 1.35
    print(f"memory saved {memory_saved:.0%} (goal >= 40%), step time x{slowdown:.2f} (goal <= 1.35): "
          f"{'pass' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "memory_saved": memory_saved, "slowdown": slowdown},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
