"""Run evaluation tasks on a model and present the results (console table, JSON document)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

from minigpt.evaluation.bpb import evaluate_bpb
from minigpt.evaluation.choice import evaluate_choice, load_items
from minigpt.evaluation.context import EvalContext
from minigpt.evaluation.spec import TaskSpec
from minigpt.evaluation.verifiable import evaluate_tasks, load_tasks
from minigpt.i18n import _

EVALUATORS: dict[str, Callable[[TaskSpec, EvalContext], dict[str, float]]] = {
    "bpb": evaluate_bpb,
    "mc": evaluate_choice,
    "tasks": evaluate_tasks,
}
"""Task kind -> the function that scores it (the kinds of `spec.KINDS`)."""


def check_task_files(spec: TaskSpec) -> None:
    """Read the item files of an mc or tasks entry now, so that one without usable items fails before a model is
    loaded or a step trained (EvalDataError naming the file, line and field). bpb inputs, which may be large,
    are read as they are scored."""
    if spec.kind == "mc":
        for path in [spec.path] + ([Path(spec.get("dev"))] if spec.get("dev") else []):
            load_items(path)
    elif spec.kind == "tasks":
        load_tasks(spec.path)


def run_task(spec: TaskSpec, ctx: EvalContext) -> dict[str, float]:
    """The metrics of one task; the model is put in eval mode and gets its previous mode back."""
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        return EVALUATORS[spec.kind](spec, ctx)
    finally:
        ctx.model.train(was_training)


def run_tasks(specs: Sequence[TaskSpec], ctx: EvalContext) -> dict[str, dict[str, float]]:
    """Task name -> its metrics, in the order given."""
    return {spec.name: run_task(spec, ctx) for spec in specs}


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{"task/metric": value}`: how a training run logs its eval tasks (metrics.jsonl, TensorBoard)."""
    return {f"{task}/{name}": float(value) for task, metrics in results.items() for name, value in metrics.items()}


def _cell(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _width(text: str) -> int:
    """Console columns of `text`: a wide (CJK) character takes two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One row per task and metric, aligned for the console (headers in the user's language)."""
    rows = [(_("task"), _("metric"), _("value"))]
    for task, metrics in results.items():
        rows += [(task, name, _cell(value)) for name, value in metrics.items()]
    widths = [max(_width(row[i]) for row in rows) for i in range(3)]
    lines = [a + " " * (widths[0] - _width(a) + 2) + b + " " * (widths[1] - _width(b) + 2)
             + " " * (widths[2] - _width(c)) + c for a, b, c in rows]
    lines.insert(1, "-" * _width(lines[0]))
    return "\n".join(lines)
