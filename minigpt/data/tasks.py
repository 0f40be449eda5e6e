"""Small verifiable tasks in SFT, DPO and RLHF formats, and a checker of answers.

Three tasks whose answers are a few tokens and computable from the prompt alone, so a ~1M-parameter
model can learn them and a rule reward can score any generation:

    add       "Add 27+45"        -> "72"
    reverse   "Reverse cabd"     -> "dbac"
    sort      "Sort dbca"        -> "abcd"

Generation is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

from minigpt.fsutil import atomic_write_text

TASKS = ("add", "reverse", "sort")
_LETTERS = string.ascii_lowercase[:8]
_PROMPT = re.compile(r"^(Add|Reverse|Sort) (\S+)$")


def solve(prompt: str) -> str | None:
    """The correct answer to a task prompt, or None when `prompt` is not a task of this module."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        return None
    verb, argument = match.groups()
    if verb == "Add":
        terms = argument.split("+")
        if len(terms) != 2 or not all(t.isdigit() for t in terms):
            return None
        return str(int(terms[0]) + int(terms[1]))
    if verb == "Reverse":
        return argument[::-1]
    return "".join(sorted(argument))


def _question(task: str, rng: random.Random) -> str:
    if task == "add":
        return f"Add {rng.randint(0, 99)}+{rng.randint(0, 99)}"
    letters = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
    return f"{'Reverse' if task == 'reverse' else 'Sort'} {letters}"


def _wrong_answer(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by a little for sums, the input or a near miss for strings."""
    if prompt.startswith("Add"):
        return str(max(0, int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])) if answer != "0" else 1)
    candidates = {prompt.split(" ", 1)[1], answer[1:] + answer[0], answer[:-1]}
    candidates.discard(answer)
    return rng.choice(sorted(c for c in candidates if c) or [answer + answer[-1]])


def generate_tasks(count: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`count` task records {"task", "prompt", "reference", "wrong"} cycling through `tasks`."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    rng = random.Random(seed)
    records = []
    for index in range(count):
        task = tasks[index % len(tasks)]
        prompt = _question(task, rng)
        answer = solve(prompt)
        records.append({"task": task, "prompt": prompt, "reference": answer,
                        "wrong": _wrong_answer(prompt, answer, rng)})
    return records


def as_sft(record: dict) -> dict:
    return {"conversations": [{"role": "user", "content": record["prompt"]},
                              {"role": "assistant", "content": record["reference"]}], "task": record["task"]}


def as_dpo(record: dict) -> dict:
    return {"prompt": record["prompt"], "chosen": record["reference"], "rejected": record["wrong"],
            "task": record["task"]}


def as_rlhf(record: dict) -> dict:
    return {"prompt": record["prompt"], "reference": record["reference"], "task": record["task"]}


FORMATS = {"sft": as_sft, "dpo": as_dpo, "rlhf": as_rlhf}


def write_task_files(out_dir: str | Path, count: int, seed: int = 0,
                     tasks: tuple[str, ...] = TASKS) -> dict[str, Path]:
    """Write sft.jsonl, dpo.jsonl and rlhf.jsonl of the same `count` tasks into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = generate_tasks(count, seed, tasks)
    paths = {}
    for kind, convert in FORMATS.items():
        paths[kind] = out_dir / f"{kind}.jsonl"
        atomic_write_text(paths[kind], "".join(json.dumps(convert(r)) + "\n" for r in records))
    return paths


def _prompt_of(task: dict | str) -> str:
    if isinstance(task, str):
        return task
    prompt = task.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = task.get("messages") or task.get("conversations") or prompt or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def expected_answer(task: dict | str) -> str | None:
    """The correct answer of a task record (its "reference", else solved from its prompt) or prompt."""
    if isinstance(task, dict) and isinstance(task.get("reference"), str):
        return task["reference"]
    return solve(_prompt_of(task))


def check_answer(task: dict | str, answer: str) -> bool:
    """True when `answer` (surrounding whitespace ignored) is the correct answer to `task`.

    `task` is a prompt string, a record of this module, or an RLHF record (`RLHFPrompts.record(i)`).
    """
    expected = expected_answer(task)
    if expected is None:
        raise ValueError(f"not a verifiable task: {_prompt_of(task)!r}")
    return answer.strip() == expected


def reward(task: dict | str, answer: str, partial: bool = True) -> float:
    """1.0 for a correct answer; with `partial`, up to 0.5 for a same-length answer by matching characters."""
    if check_answer(task, answer):
        return 1.0
    expected, answer = expected_answer(task), answer.strip()
    if not partial or len(answer) != len(expected):
        return 0.0
    return 0.5 * sum(a == b for a, b in zip(answer, expected, strict=True)) / len(expected)
