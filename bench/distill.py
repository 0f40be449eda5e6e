"""Knowledge distillation's learning proof: a student distilled from a larger teacher against the same student
trained on cross-entropy alone, the same steps on the same data.

    python bench/distill.py                       # tinyshakespeare: teacher 6x256 (600 steps), student tiny (300 steps)
    python bench/distill.py --teacher-steps 600 --student-steps 200 --json out.json
    python bench/distill.py --quick               # plumbing check: 2-layer models, a minute

First a teacher (`--mode pretrain`, a wider and deeper model than the student) trains on the data; it brings
its tokenizer, which the students share. Then the student preset trains twice from the same seed (the same
initial weights and the same batches): `--mode pretrain` (cross-entropy only) and `--mode distill --teacher`
(forward KL at `--distill-temperature`, mixed by `--distill-alpha`). Reported: each run's held-out loss and
bits per byte over the whole validation split (the teacher's too), and the seconds each took. The runs go
through the real `Trainer` (plain engine), in this process, on whatever device `--device` picks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.config import PRESETS, TrainConfig  # noqa: E402
from minigpt.signals import EXIT_FINISHED  # noqa: E402
from minigpt.train.loop import Trainer  # noqa: E402
from minigpt.weights import read_consolidated_meta  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEACHER = dataclasses.replace(PRESETS["tiny"], hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
                              ffn_hidden_size=704)
"""The default teacher: 6 layers of 256 (about 4.7M parameters besides the embeddings) over tiny's 4 of 128."""
QUICK_STUDENT = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                    ffn_hidden_size=64, max_seq_len=64)
QUICK_TEACHER = dataclasses.replace(QUICK_STUDENT, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                                    ffn_hidden_size=256)


@contextlib.contextmanager
def presets(**configs) -> Iterator[None]:
    """Model presets added (or replaced) for the duration of a `with` block."""
    saved = {name: PRESETS.get(name) for name in configs}
    PRESETS.update(configs)
    try:
        yield
    finally:
        for name, config in saved.items():
            if config is None:
                PRESETS.pop(name, None)
            else:
                PRESETS[name] = config


def last_validation(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("split") == "val"][-1]


def train(mode: str, out: Path, preset: str, steps: int, common: dict, **options) -> dict:
    """One run to the end; its final validation metrics and its seconds."""
    started = time.perf_counter()
    cfg = TrainConfig.of(mode=mode, config=preset, out=str(out), max_steps=steps, **{**common, **options})
    assert Trainer(cfg).run() == EXIT_FINISHED
    row = last_validation(out)
    return {"val_loss": row["val_loss"], "val_bpb": row["val_bpb"], "seconds": time.perf_counter() - started,
            **({"val_kl": row["val_kl"]} if "val_kl" in row else {})}


def compare(root: Path, teacher_steps: int = 600, student_steps: int = 300, *, quick: bool = False,
            data: Path | None = None, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3,
            temperature: float = 1.0, alpha: float = 0.5, device: str = "auto") -> dict:
    """Train the teacher, then the student on cross-entropy alone and distilled; each run's figures."""
    data = data or (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    student, teacher = ("distill_student", "distill_teacher")
    configs = {teacher: QUICK_TEACHER if quick else TEACHER,
               student: QUICK_STUDENT if quick else PRESETS["tiny"]}
    if quick:
        seq_len = min(seq_len, 48)
    common = dict(data=[str(data)] if data else [], data_dir=str(root), seq_len=seq_len, batch_size=batch_size,
                  learning_rate=lr, warmup_steps=20, eval_interval=0, eval_batches=10 ** 6, save_interval=0,
                  log_interval=10 ** 6, sample_prompt="a", device=device, precision="fp32",
                  vocab_size=1024 if data else 0)
    results = {}
    with presets(**configs):
        results["teacher"] = train("pretrain", root / "teacher", teacher, teacher_steps, common)
        teacher_final = root / "teacher" / "final"
        same = dict(common, tokenizer=str(teacher_final))  # the students learn in the teacher's tokenizer
        results["ce"] = train("pretrain", root / "student_ce", student, student_steps, same)
        results["distill"] = train("distill", root / "student_distill", student, student_steps, same,
                                   teacher=str(teacher_final), distill_temperature=temperature, distill_alpha=alpha)
    results["settings"] = {"data": str(data or "built-in demo corpus"), "teacher_steps": teacher_steps,
                           "student_steps": student_steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
                           "temperature": temperature, "alpha": alpha,
                           "teacher_params": read_consolidated_meta(teacher_final)[0].num_params(),
                           "student_params": read_consolidated_meta(root / "student_ce" / "final")[0].num_params()}
    return results


def table(results: dict) -> str:
    settings = results["settings"]
    lines = [f"data {settings['data']}; teacher {settings['teacher_params']:,} parameters, "
             f"{settings['teacher_steps']} steps; student {settings['student_params']:,} parameters, "
             f"{settings['student_steps']} steps; batch {settings['batch_size']} x {settings['seq_len']} tokens; "
             f"T {settings['temperature']:g}, alpha {settings['alpha']:g}",
             "| run | held-out loss | held-out bits/byte | seconds |", "|---|---|---|---|"]
    for name, label in (("teacher", "teacher (pretrain)"), ("ce", "student, cross-entropy only"),
                        ("distill", "student, distilled")):
        row = results[name]
        lines.append(f"| {label} | {row['val_loss']:.4f} | {row['val_bpb']:.4f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--data", type=Path, default=None, help="a text file (default: tinyshakespeare, if present)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("checkpoints/bench_distill"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="2- and 3-layer models, a few steps: plumbing only")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 60), min(args.student_steps, 30)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "student_ce", "student_distill"):  # every run anew
        shutil.rmtree(args.work / name, ignore_errors=True)
    results = compare(args.work, args.teacher_steps, args.student_steps, quick=args.quick, data=args.data,
                      temperature=args.temperature, alpha=args.alpha, device=args.device)
    results["pass"] = results["distill"]["val_bpb"] < results["ce"]["val_bpb"]
    print(table(results))
    print(f"distilled student beats cross-entropy only: {results['pass']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
