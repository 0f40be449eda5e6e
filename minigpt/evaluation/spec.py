"""The `--task` syntax: `KIND:PATH[,key=value...]`, parsed and checked without touching any file.

    bpb:data/val.txt                  bits per byte / perplexity of a text, JSONL or shard directory
    bpb:shards/demo,split=val,max_tokens=200000
    mc:ceval/val.jsonl,dev=ceval/dev.jsonl,shots=5
    tasks:heldout/rlhf.jsonl,max_new_tokens=8

This module imports nothing of the project but `minigpt.i18n` (no dependencies of its own), so the training
config can validate `--eval-task` with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minigpt.i18n import _

KINDS = {
    "bpb": {"split": str, "field": str, "seq_len": int, "max_tokens": int, "name": str},
    "mc": {"dev": str, "shots": int, "style": str, "limit": int, "name": str},
    "tasks": {"max_new_tokens": int, "partial": bool, "limit": int, "name": str},
}
"""Task kind -> the options it accepts and their types."""
MC_STYLES = ("text", "letter")


class TaskSpecError(ValueError):
    """A `--task` entry that does not parse: unknown kind or option, bad value, missing path."""


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: its kind, input path and options (typed as in `KINDS`)."""

    kind: str
    path: Path
    options: dict = field(default_factory=dict)
    text: str = ""
    """The entry as the user wrote it."""

    @property
    def name(self) -> str:
        """The task's name in results: the `name=` option, else KIND:FILE NAME."""
        return self.options.get("name") or f"{self.kind}:{self.path.name}"

    def get(self, option: str, default=None):
        return self.options.get(option, default)


def _convert(entry: str, key: str, value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise TaskSpecError(_("--task {entry}: option {key} takes true or false, got {value!r}").format(
                entry=entry, key=key, value=value))
        return value.lower() in ("1", "true", "yes")
    if kind is int:
        try:
            number = int(value)
        except ValueError:
            raise TaskSpecError(_("--task {entry}: option {key} takes an integer, got {value!r}").format(
                entry=entry, key=key, value=value)) from None
        if number < 0:
            raise TaskSpecError(_("--task {entry}: option {key} must not be negative, got {value}").format(
                entry=entry, key=key, value=number))
        return number
    return value


def parse_task_spec(entry: str) -> TaskSpec:
    """`KIND:PATH[,key=value...]` as a `TaskSpec`; `TaskSpecError` names the entry and what is wrong."""
    kind, sep, rest = entry.partition(":")
    if not sep or kind not in KINDS:
        raise TaskSpecError(_("--task {entry}: expected KIND:PATH[,key=value...] with KIND one of {kinds}").format(
            entry=entry, kinds=", ".join(KINDS)))
    path, *pairs = rest.split(",")
    if not path:
        raise TaskSpecError(_("--task {entry}: no path after {kind}:").format(entry=entry, kind=kind))
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KINDS[kind]:
            raise TaskSpecError(_("--task {entry}: {pair!r} is not an option of {kind} (options: {options})").format(
                entry=entry, pair=pair, kind=kind, options=", ".join(f"{k}=" for k in KINDS[kind])))
        options[key] = _convert(entry, key, value, KINDS[kind][key])
    if kind == "mc" and options.get("style", "text") not in MC_STYLES:
        raise TaskSpecError(_("--task {entry}: style must be one of {styles}, got {style!r}").format(
            entry=entry, styles=MC_STYLES, style=options["style"]))
    if kind == "mc" and options.get("shots") and not options.get("dev"):
        raise TaskSpecError(_("--task {entry}: shots={shots} needs dev=PATH (the examples are taken from the dev "
                              "file, never from the evaluated items)").format(entry=entry, shots=options["shots"]))
    for key in ("seq_len", "max_new_tokens", "limit", "max_tokens"):
        if key in options and options[key] == 0:
            raise TaskSpecError(_("--task {entry}: {key} must be positive").format(entry=entry, key=key))
    return TaskSpec(kind, Path(path), options, entry)
