"""Quality per CPU-minute: the documented recipe on tinyshakespeare, timed as a user would run it.

    python bench/quality.py                       # bench/recipes/shakespeare.json
    python bench/quality.py --set max_steps=200   # shorter run (the time budget then says nothing)
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/quality.py   # as on a CPU without native bf16 (AVX2-only)

The recipe asks for `--precision auto`: bf16 on a CPU with native bf16 (avx512_bf16, amx_bf16, Arm bf16),
fp32 elsewhere, where bf16 autocast is emulated and ~8x slower. What the run chose, and why, is read back
from its log into the result.

1. Tokenizer + pre-tokenization (not timed against the budget, reported): `shakespeare_data.prepare`.
2. `python launch/train.py` with the recipe's flags, timed from process start to exit: that wall
   time is what the budget limits. The run evaluates the whole validation text once, at the end,
   inside the timed process (its `val_bpb` is the figure of merit); it saves checkpoints every
   `save_interval` steps (also inside the timed process).
3. Outside the budget: every saved checkpoint is evaluated on the whole validation text, giving
   the learning curve (val bpb against wall time since the process started), plotted to a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minigpt.config import MiniGPTConfig  # noqa: E402
from minigpt.data.datasets import PretrainWindows  # noqa: E402
from minigpt.data.shards import open_shard  # noqa: E402
from minigpt.metrics import token_byte_lengths  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "bench" / "recipes" / "shakespeare.json"
CHINESE_RECIPE = REPO / "bench" / "recipes" / "zh_classics.json"
BASELINE_BPB = 2.72
"""The minimal GPT trainer's CPU recipe on the same split: 1.886 nats/char after 125 s."""
PRECISION_LINE = re.compile(r"^\[minigpt\] precision (\w+) \((.*); override with --precision\)$", re.M)
COMPILE_LINE = re.compile(r"^--compile auto: (.*)$", re.M)


@dataclass
class QualityResult:
    """What one recipe run gave: the in-process final bpb, the wall time, and the learning curve."""

    val_bpb: float
    wall_seconds: float
    steps: int
    tokens_seen: int
    tokens_per_sec: float
    tokenizer_seconds: float
    pretokenize_seconds: float
    vocab_size: int
    bytes_per_token: float
    parameters: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the training process started, val bpb on the whole validation text)."""
    run_dir: str = ""
    precision: str = ""
    """What the run trained in (`--precision auto` resolved), from its log."""
    precision_why: str = ""
    compile_decision: str = ""
    """What `--compile auto` decided and why, from its log ("" when compile was not auto)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for the run on top of the recipe's (e.g. ONEDNN_MAX_CPU_ISA)."""
    sample: str = ""
    """The final weights' continuation of the recipe's `sample_prompt` (greedy), when it has one."""


def load_recipe(path: Path) -> dict:
    recipe = json.loads(Path(path).read_text())
    for key in ("tokenizer_vocab_size", "time_budget_s", "train_flags"):
        if key not in recipe:
            raise KeyError(f"{path}: recipe field {key!r} missing")
    return recipe


def train_command(flags: dict, dataset_dir: Path, tokenizer_dir: Path, run_dir: Path) -> list[str]:
    """`python launch/train.py ...` for the recipe's flags plus where the data and the run live."""
    command = [sys.executable, str(REPO / "launch" / "train.py")]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        else:
            command += [flag, str(value)]
    return command + ["--data", str(dataset_dir), "--tokenizer", str(tokenizer_dir), "--out", str(run_dir)]


def run_decisions(log_text: str) -> dict[str, str]:
    """What the training process decided at start-up, read from its log: the precision it resolved and why,
    and what `--compile auto` chose; empty strings for what the log does not say."""
    precision = PRECISION_LINE.search(log_text)
    compiled = COMPILE_LINE.search(log_text)
    return {"precision": precision.group(1) if precision else "",
            "precision_why": precision.group(2) if precision else "",
            "compile_decision": compiled.group(1) if compiled else ""}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run's metrics.jsonl."""
    steps, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (evals if record.get("split") == "val" else steps).append(record)
    return steps, evals


@torch.no_grad()
def evaluate_bpb(model: MiniGPT, dataset_dir: Path, tokenizer: Tokenizer, seq_len: int, batch_size: int = 64) -> float:
    """Bits per byte over every full window of the validation shard (the same windows the loop evaluates)."""
    model.eval()
    windows = PretrainWindows(open_shard(dataset_dir, "val"), seq_len)
    byte_lengths = token_byte_lengths(tokenizer)
    loss_sum, num_bytes = 0.0, 0.0
    for start in range(0, len(windows), batch_size):
        samples = [windows[i] for i in range(start, min(start + batch_size, len(windows)))]
        inputs = torch.from_numpy(torch.utils.data.default_collate([s["input_ids"] for s in samples]).numpy())
        labels = torch.utils.data.default_collate([s["labels"] for s in samples])
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
        num_bytes += byte_lengths[labels.flatten()].sum().item()
    return loss_sum / math.log(2) / num_bytes


def checkpoint_curve(run_dir: Path, dataset_dir: Path, tokenizer: Tokenizer, started: float) -> list[tuple[float, float]]:
    """(seconds since start, val bpb) for every checkpoint the run saved, evaluated here (not timed)."""
    snapshot = json.loads((run_dir / "training_config_snapshot.json").read_text())
    model = MiniGPT(MiniGPTConfig.from_dict(snapshot["model"]))
    step_times = {record["step"]: record["time"] for record in read_metrics(run_dir)[0]}
    curve = []
    for checkpoint in sorted((run_dir / "ckpt").glob("step_*")):
        step = int(checkpoint.name.removeprefix("step_"))
        state = torch.load(checkpoint / "engine.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        # metrics.jsonl numbers steps from 0: checkpoint step N is written after record N - 1.
        curve.append((step_times[step - 1] - started, evaluate_bpb(model, dataset_dir, tokenizer, snapshot["seq_len"])))
    return curve


def prepare_data(recipe: dict, work: Path, limit: int | None = None):
    """The recipe's tokenizer and shards: tinyshakespeare (by position) or zh_classics (by document;
    `limit`: its first documents only, for quick runs)."""
    if recipe.get("data", "shakespeare") == "zh_classics":
        import zh_classics_data

        return zh_classics_data.prepare(work / "zh_classics", recipe["tokenizer_vocab_size"], limit=limit)
    import shakespeare_data

    return shakespeare_data.prepare(work / "shakespeare", recipe["tokenizer_vocab_size"])


def sample_text(run_dir: Path, prompt: str, max_new_tokens: int = 80) -> str:
    """What the run's final weights write after `prompt` (greedy; "" without a prompt)."""
    if not prompt:
        return ""
    from minigpt.generate import GenerationConfig, TextGenerator
    from minigpt.weights import load_consolidated

    model, tokenizer = load_consolidated(run_dir / "final")
    generator = TextGenerator(model, tokenizer)
    return generator.generate([prompt], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))[0]


def run_quality(work: Path, recipe_path: Path = DEFAULT_RECIPE, overrides: dict | None = None,
                log=print, env: dict[str, str] | None = None, limit: int | None = None) -> QualityResult:
    """Prepare the data, run the recipe through launch/train.py, evaluate its checkpoints. `env` adds
    variables to the training process's environment (ONEDNN_MAX_CPU_ISA=AVX2 emulates an AVX2-only CPU)."""
    recipe = load_recipe(recipe_path)
    flags = {**recipe["train_flags"], **(overrides or {})}
    prepared = prepare_data(recipe, work, limit)
    log(f"quality: tokenizer {prepared.vocab_size} tokens in {prepared.tokenizer_seconds:.1f}s, pre-tokenized "
        f"{prepared.train_tokens:,} + {prepared.val_tokens:,} tokens in {prepared.pretokenize_seconds:.1f}s "
        f"({prepared.bytes_per_token:.2f} bytes/token)")
    run_dir = work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = train_command(flags, prepared.dataset_dir, prepared.tokenizer_dir, run_dir)
    log("quality: " + " ".join(command[1:]))
    # The recipe's environment (OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning,
    # which keeps a shared 2-core machine from collapsing when another process holds a core).
    # MINIGPT_LANG=en: the log lines read back below are matched in English, whatever the user's locale.
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MINIGPT_LANG": "en", **recipe.get("env", {}), **(env or {})}
    started_unix, started = time.time(), time.perf_counter()
    with open(work / "train.log", "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=process_env, cwd=REPO)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"training exited with code {code}; see {work / 'train.log'}")
    steps, evals = read_metrics(run_dir)
    final_bpb = evals[-1]["val_bpb"]
    tokenizer = Tokenizer(prepared.tokenizer_dir)
    curve = checkpoint_curve(run_dir, prepared.dataset_dir, tokenizer, started_unix)
    curve.append((wall, final_bpb))
    snapshot = json.loads((run_dir / "training_config_snapshot.json").read_text())
    train_seconds = sum(r["seconds"] for r in steps)
    tokens = sum(r["tokens"] for r in steps)
    return QualityResult(val_bpb=final_bpb, wall_seconds=wall, steps=len(steps), tokens_seen=tokens,
                         tokens_per_sec=tokens / train_seconds, tokenizer_seconds=prepared.tokenizer_seconds,
                         pretokenize_seconds=prepared.pretokenize_seconds, vocab_size=prepared.vocab_size,
                         bytes_per_token=prepared.bytes_per_token,
                         parameters=MiniGPTConfig.from_dict(snapshot["model"]).num_params(),
                         curve=sorted(curve), run_dir=str(run_dir), env=dict(env or {}),
                         sample=sample_text(run_dir, recipe.get("sample_prompt", "")),
                         **run_decisions((work / "train.log").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "quality")
    parser.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE",
                        help="override recipe train flags, e.g. --set max_steps=200 learning_rate=0.002")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    result = run_quality(args.work, args.recipe, overrides)
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
