"""LoRA (`--lora-rank`) against full fine-tuning: trainable parameters, optimizer state, peak memory and step time.

    python bench/lora.py                      # small preset, context 256, batch 8, rank 8, 12 steps each
    python bench/lora.py --config tiny --steps 6 --json out.json
    python bench/lora.py --quick              # plumbing check: the figures mean nothing

Each variant runs in a fresh process (so its peak RSS is its own): the same model from the same seed, the same
random token batches, the plain engine's AdamW step in fp32, one warm-up step not timed. Step time is the median
of the timed steps. The processes alternate (full, LoRA, full, LoRA, ...) over `--repeats` rounds so both see the
same machine load; the table gives each figure's median over the rounds and the LoRA/full ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_variant(config: str, rank: int, seq_len: int, batch: int, steps: int) -> dict:
    """One variant in this process: rank 0 is full fine-tuning."""
    import torch
    import torch.nn.functional as F

    from minigpt.config import TrainConfig, get_config
    from minigpt.engine.plain import PlainEngine
    from minigpt.model import MiniGPT

    torch.manual_seed(0)
    model_config = get_config(config, max_seq_len=max(seq_len, get_config(config).max_seq_len))
    model = MiniGPT(model_config)
    total = sum(p.numel() for p in model.parameters())
    if rank:
        from minigpt.lora import attach_lora

        attach_lora(model, rank, 2.0 * rank, 0.0, [])
    cfg = TrainConfig.of(precision="fp32", compile="off", batch_size=batch, learning_rate=1e-4, warmup_steps=0,
                         max_steps=steps + 1)
    engine = PlainEngine(model, cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, model_config.vocab_size, (batch, seq_len + 1), generator=generator)
        started = time.perf_counter()
        logits = engine(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        if step:  # the first step allocates the optimizer state: not timed
            times.append(time.perf_counter() - started)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in engine.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    return {"total_params": total, "trainable_params": trainable, "optimizer_state_mb": optimizer_bytes / 2**20,
            "step_s": statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare(config: str, rank: int, seq_len: int, batch: int, steps: int, repeats: int) -> dict:
    """Both variants, alternating in fresh processes; medians over the rounds."""
    rounds: dict[str, list[dict]] = {"full": [], "lora": []}
    for _round in range(repeats):
        for name, variant_rank in (("full", 0), ("lora", rank)):
            done = subprocess.run([sys.executable, __file__, "--worker", str(variant_rank), "--config", config,
                                   "--seq-len", str(seq_len), "--batch", str(batch), "--steps", str(steps)],
                                  capture_output=True, text=True, check=True)
            rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
              for name, runs in rounds.items()}
    result["settings"] = {"config": config, "rank": rank, "seq_len": seq_len, "batch": batch, "steps": steps,
                          "repeats": repeats, "load_average": os.getloadavg()[0]}
    return result


def table(result: dict) -> str:
    full, lora = result["full"], result["lora"]
    s = result["settings"]
    rows = [f"LoRA rank {s['rank']} vs full fine-tuning, {s['config']} preset, batch {s['batch']} x {s['seq_len']} "
            f"tokens, fp32 on CPU, {s['steps']} timed steps x {s['repeats']} rounds "
            f"(load average {s['load_average']:.2f})",
            f"{'':<22}{'full':>14}{'LoRA':>14}{'LoRA/full':>11}"]
    for key, label, fmt in (("trainable_params", "trainable parameters", "{:,.0f}"),
                            ("optimizer_state_mb", "optimizer state MB", "{:.1f}"),
                            ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("step_s", "step time s", "{:.3f}")):
        rows.append(f"{label:<22}{fmt.format(full[key]):>14}{fmt.format(lora[key]):>14}"
                    f"{lora[key] / full[key]:>10.3f}x")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 steps, 1 round")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run_variant(args.config, args.worker, args.seq_len, args.batch, args.steps)))
        return
    if args.quick:
        args.config, args.steps, args.repeats, args.seq_len, args.batch = "tiny", 2, 1, 64, 2
    result = compare(args.config, args.rank, args.seq_len, args.batch, args.steps, args.repeats)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
