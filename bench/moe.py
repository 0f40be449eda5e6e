"""Mixture of experts against dense on the tinyshakespeare quality recipe: `tiny-moe` vs `tiny`.

    python bench/moe.py                     # 240 steps each (short: a row, not the 125 s budget)
    python bench/moe.py --max-steps 720     # the recipe's full length

The dense `tiny` (FFN 352) and `tiny-moe` (4 experts of FFN 128, top-2, + 1 shared: an active FFN width of
384) have about the same active parameters per token. Both run bench/quality.py's recipe (same tokenizer,
data, flags, plain engine) for the same number of steps; the row reports final val bits/byte, the val bpb
of both at equal wall time (interpolated on the checkpoint curves at the shorter run's wall time),
tokens/s, and the MoE's expert balance at the end (largest and smallest share of a layer's routes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import DEFAULT_RECIPE, read_metrics, run_quality  # noqa: E402

from minigpt.config import get_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bpb_at(curve: list[tuple[float, float]], seconds: float) -> float:
    """Val bpb at `seconds` by linear interpolation on a (seconds, bpb) curve."""
    points = sorted(curve)
    for (t0, b0), (t1, b1) in zip(points, points[1:], strict=False):
        if t0 <= seconds <= t1:
            return b0 + (b1 - b0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return points[-1][1] if seconds >= points[-1][0] else points[0][1]


def expert_balance(run_dir: Path) -> dict[str, float]:
    last = read_metrics(run_dir)[0][-1]
    shares = {k: v for k, v in last.items() if k.startswith("moe_load/")}
    return {"max_share": max(shares.values()), "min_share": min(shares.values()),
            "aux_loss": last["moe_aux_loss"]} if shares else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "moe")
    parser.add_argument("--max-steps", type=int, default=240)
    args = parser.parse_args(argv)
    runs = {}
    for preset in ("tiny", "tiny-moe"):
        overrides = {"config": preset, "max_steps": args.max_steps, "save_interval": max(args.max_steps // 6, 1)}
        runs[preset] = run_quality(args.work / preset, DEFAULT_RECIPE, overrides)
    equal = min(r.wall_seconds for r in runs.values())
    rows = []
    for preset, result in runs.items():
        config = get_config(preset, vocab_size=result.vocab_size)
        rows.append({"preset": preset, "params": config.num_params(), "active_params": config.active_params(),
                     "steps": result.steps, "wall_s": round(result.wall_seconds, 1),
                     "tokens_per_sec": round(result.tokens_per_sec), "val_bpb": round(result.val_bpb, 4),
                     f"val_bpb_at_{equal:.0f}s": round(bpb_at(result.curve, equal), 4),
                     **expert_balance(Path(result.run_dir))})
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
