"""Small verifiable tasks in SFT, DPO and RLHF formats, and a checker of answers.

Three tasks whose answers are a few tokens and computable from the prompt alone, so a ~1M-parameter
model can learn them and a rule reward can score any generation:

    add       "Add 27+45"        -> "72"       (in Chinese: "计算 27+45")
    reverse   "Reverse cabd"     -> "dbac"     ("倒序写出 cabd")
    sort      "Sort dbca"        -> "abcd"     ("按字母排序 dbca")

Generation is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Collection, Iterable
from pathlib import Path

from minigpt.data.records import RecordError, json_lines
from minigpt.fsutil import atomic_write_text
from minigpt.i18n import _

TASKS = ("add", "reverse", "sort")
LANGUAGES = ("en", "zh")
VERBS = {"add": "Add", "reverse": "Reverse", "sort": "Sort"}
CHINESE_VERBS = {"Add": "计算", "Reverse": "倒序写出", "Sort": "按字母排序"}
"""The Chinese phrasing of each task verb ("计算 27+45" asks what "Add 27+45" asks)."""
_ENGLISH_VERB = {chinese: english for english, chinese in CHINESE_VERBS.items()}
_LETTERS = string.ascii_lowercase[:8]
_PROMPT = re.compile(r"^(Add|Reverse|Sort|计算|倒序写出|按字母排序) (\S+)$")


def phrase(prompt: str, language: str) -> str:
    """A task prompt in `language` ("en" as generated, "zh" with the Chinese verb)."""
    if language == "en":
        return prompt
    verb, argument = prompt.split(" ", 1)
    return f"{CHINESE_VERBS[verb]} {argument}"


def same_task_key(prompt: str) -> str:
    """What makes two prompts the same question: a task prompt in its English phrasing ("计算 27+45" and
    "Add 27+45" are one question), any other prompt with its surrounding whitespace removed. Held-out sets
    and `--exclude-from` compare these, so a Chinese test prompt is never a training prompt in English."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        return prompt.strip()
    verb, argument = match.groups()
    return f"{_ENGLISH_VERB.get(verb, verb)} {argument}"


def task_of(prompt: str) -> str | None:
    """The task type ("add", "reverse", "sort") a prompt in either language asks for, else None."""
    match = _PROMPT.match(prompt.strip())
    return _ENGLISH_VERB.get(match.group(1), match.group(1)).lower() if match else None


def solve(prompt: str) -> str | None:
    """The correct answer to a task prompt (English or Chinese phrasing), or None when `prompt` is not a
    task of this module."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        return None
    verb, argument = match.groups()
    verb = _ENGLISH_VERB.get(verb, verb)
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
    letters = "".join(rng.choice(_LETTERS) for _letter in range(rng.randint(3, 5)))
    return f"{'Reverse' if task == 'reverse' else 'Sort'} {letters}"


def _wrong_answer(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by a little for sums, the input or a near miss for strings."""
    if prompt.startswith("Add"):
        return str(max(0, int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])) if answer != "0" else 1)
    candidates = {prompt.split(" ", 1)[1], answer[1:] + answer[0], answer[:-1]}
    candidates.discard(answer)
    return rng.choice(sorted(c for c in candidates if c) or [answer + answer[-1]])


def generate_tasks(count: int, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                   exclude: Collection[str] | None = None, language: str = "en") -> list[dict]:
    """`count` task records {"task", "prompt", "reference", "wrong"} cycling through `tasks`, the prompts
    phrased in `language` ("en": "Add 27+45", "zh": "计算 27+45"; the same draw either way).

    With `exclude` (`same_task_key`s of training prompts, as `read_prompts` returns them) the records form a
    held-out set: no question of `exclude` in either language and no question twice. Without it the draw is the plain seeded sequence (repeats allowed).
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(_("unknown task(s) {tasks}; choose from {choices}").format(tasks=sorted(unknown),
                                                                                    choices=TASKS))
    if language not in LANGUAGES:
        raise ValueError(_("unknown language {language!r}; choose from {choices}").format(language=language,
                                                                                          choices=LANGUAGES))
    rng = random.Random(seed)
    records = []
    taken = set(exclude) if exclude is not None else None
    attempts = 0
    while len(records) < count:
        task = tasks[len(records) % len(tasks)]
        question = _question(task, rng)
        prompt = phrase(question, language)
        if taken is not None:
            attempts += 1
            if attempts > 100 * count + 10_000:
                raise ValueError(_("only {found} of {count} {task} prompts found outside the excluded prompts: the "
                                   "task space is nearly used up; ask for fewer").format(found=len(records),
                                                                                         count=count, task=task))
            if question in taken:  # the English phrasing: same_task_key(prompt)
                continue
            taken.add(question)
        answer = solve(question)
        records.append({"task": task, "prompt": prompt, "reference": answer,
                        "wrong": _wrong_answer(question, answer, rng)})
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


def write_task_files(out_dir: str | Path, count: int, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                     exclude: Collection[str] | None = None, language: str = "en") -> dict[str, Path]:
    """Write sft.jsonl, dpo.jsonl and rlhf.jsonl of the same `count` tasks into `out_dir`
    (a held-out set disjoint from `exclude` when given; see `generate_tasks`)."""
    out_dir = Path(out_dir)
    records = generate_tasks(count, seed, tasks, exclude, language)  # bad options fail before anything is made
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, convert in FORMATS.items():
        paths[kind] = out_dir / f"{kind}.jsonl"
        atomic_write_text(paths[kind], "".join(json.dumps(convert(r), ensure_ascii=False) + "\n" for r in records))
    return paths


def prompt_of(task: dict | str) -> str:
    """The prompt of a task record in any of the formats (sft, dpo, rlhf) or of a plain string;
    a multiple-choice record's `question`; "" when there is none."""
    if isinstance(task, str):
        return task
    prompt = task.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(task.get("question"), str):
        return task["question"]
    messages = task.get("messages") or task.get("conversations") or prompt or []
    if not isinstance(messages, list):
        return ""
    users = [m["content"] for m in messages
             if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else ""


def read_prompts(paths: Iterable[str | Path]) -> set[str]:
    """The `same_task_key` of every prompt in JSONL files of any task format: what a held-out set must not
    contain, in either language. Raises RecordError (a ValueError) naming the file and line of a bad record."""
    prompts: set[str] = set()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise RecordError(_("{path}: no such file (given as a training file to exclude)").format(path=path))
        for _number, record in json_lines(path):
            prompt = prompt_of(record) if isinstance(record, (dict, str)) else ""
            if prompt.strip():
                prompts.add(same_task_key(prompt))
    return prompts


def final_answer(record: dict) -> str | None:
    """The content of a conversation's closing assistant turn (an SFT record's answer), else None."""
    messages = record.get("messages") or record.get("conversations")
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        return last["content"]
    return None


def expected_answer(task: dict | str) -> str | None:
    """The correct answer of a task record or prompt: its "reference", else the closing assistant turn of
    a conversation (SFT format), else solved from the prompt."""
    if isinstance(task, dict):
        if isinstance(task.get("reference"), str):
            return task["reference"]
        answer = final_answer(task)
        if answer is not None:
            return answer
    return solve(prompt_of(task))


def check_answer(task: dict | str, answer: str) -> bool:
    """True when `answer` (surrounding whitespace ignored) is the correct answer to `task`.

    `task` is a prompt string, a record of this module, or an RLHF record (`RLHFPrompts.record(i)`).
    """
    expected = expected_answer(task)
    if expected is None:
        raise ValueError(_("not a verifiable task: {prompt!r}").format(prompt=prompt_of(task)))
    return answer.strip() == expected


def reward(task: dict | str, answer: str, partial: bool = True) -> float:
    """1.0 for a correct answer; with `partial`, up to 0.5 for a same-length answer by matching characters."""
    if check_answer(task, answer):
        return 1.0
    expected, answer = expected_answer(task), answer.strip()
    if not partial or len(answer) != len(expected):
        return 0.0
    return 0.5 * sum(a == b for a, b in zip(answer, expected, strict=True)) / len(expected)
