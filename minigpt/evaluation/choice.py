"""Multiple choice by log-likelihood, in the C-Eval / CMMLU / MMLU field layout.

Each item has a `question`, choices `A`, `B`, ... (or a `choices` list) and the `answer` letter (or its
0-based index as a JSON integer: MMLU's Hub copy stores `choices` and `answer` so); field names in any
case, so C-Eval's and CMMLU's CSV files and JSONL exports of MMLU work as they are. The model scores every
choice as a continuation of the prompt; the prediction is the choice with the highest summed
log-probability (`acc`) or with the highest log-probability per character of the choice
(`acc_norm`, as lm-evaluation-harness normalises: the space before the choice is not counted). Two prompt styles:

    text   (default)  "Question: {question}\\nAnswer:" continued by " {choice text}"
    letter            the question, then "A. {A}" ... one per line, then "Answer:" continued by " A", " B", ...

Few-shot examples (`shots=N`) are the first N items of the `dev=` file, each shown with its answer.
Continuation tokens are the tail of encode(context + continuation) after encode(context), as the
harness does; a context too long for the model loses its oldest tokens.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.data.records import RecordError, csv_records, jsonl_objects
from minigpt.data.tasks import same_task_key
from minigpt.evaluation.context import EvalContext, EvalDataError, global_batches
from minigpt.evaluation.spec import TaskSpec
from minigpt.i18n import _
from minigpt.metrics import MetricSums

SUMS = ("correct", "correct_norm", "items", "gold_logprob")
DELIMITER = " "
"""Joins the prompt and a choice (lm-evaluation-harness's default target delimiter)."""


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice."""


def _records(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise EvalDataError(_("{path}: no such file").format(path=path))
    name = path.name.lower()
    if not name.endswith((".csv", ".jsonl")):
        raise EvalDataError(_("{path}: multiple-choice items must be .jsonl or .csv").format(path=path))
    try:
        return csv_records(path) if name.endswith(".csv") else list(jsonl_objects(path))
    except RecordError as err:
        raise EvalDataError(str(err)) from None


def _item(path: Path, number: int, record: dict) -> ChoiceItem:
    fields = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
    where = f"{path}:{number}"
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(_("{where}: field 'question' missing or empty").format(where=where))
    choices = []
    for letter in string.ascii_lowercase:
        value = fields.get(letter)
        if value is None or value == "":
            break
        choices.append(str(value))
    if not choices and isinstance(fields.get("choices"), list):  # MMLU's Hub layout: "choices": [...]
        choices = [str(c) for c in fields["choices"]]
    if len(choices) < 2:
        raise EvalDataError(_("{where}: needs choice fields A and B at least (found {count} choice(s))").format(
            where=where, count=len(choices)))
    answer = str(fields.get("answer", "")).strip().upper()
    if isinstance(fields.get("answer"), int) and 0 <= fields["answer"] < len(choices):  # MMLU on the Hub: 0..3
        answer = string.ascii_uppercase[fields["answer"]]
    if len(answer) != 1 or not "A" <= answer < chr(ord("A") + len(choices)):
        raise EvalDataError(_("{where}: field 'answer' must be one of the choice letters {letters}, got {answer!r}")
                            .format(where=where, letters=string.ascii_uppercase[:len(choices)],
                                    answer=fields.get("answer")))
    return ChoiceItem(question.strip(), tuple(choices), ord(answer) - ord("A"))


def load_items(path: Path) -> list[ChoiceItem]:
    """The items of a .jsonl or .csv file; EvalDataError names the file, line and field of a bad one, or says
    that the file has no items."""
    items = [_item(path, number, record) for number, record in _records(path)]
    if not items:
        raise EvalDataError(_("{path}: no items (the file is empty or holds only a header)").format(path=path))
    return items


def _question_text(item: ChoiceItem, style: str) -> str:
    if style == "letter":
        options = "".join(f"\n{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{item.question}{options}\nAnswer:"
    return f"Question: {item.question}\nAnswer:"


def continuations(item: ChoiceItem, style: str) -> list[str]:
    """The scored continuations: each choice (its text, or its letter) after DELIMITER."""
    if style == "letter":
        return [DELIMITER + string.ascii_uppercase[i] for i in range(len(item.choices))]
    return [DELIMITER + c for c in item.choices]


def context_text(item: ChoiceItem, shots: list[ChoiceItem], style: str) -> str:
    """The prompt for `item`: the few-shot examples with their answers, then the item's question."""
    examples = "".join(_question_text(s, style) + continuations(s, style)[s.answer] + "\n\n" for s in shots)
    return examples + _question_text(item, style)


def encode_pair(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of context + continuation (oldest context tokens dropped to fit `max_len`) and how many
    of them, at the end, are the continuation."""
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    tail = len(whole) - len(context_ids)
    if tail <= 0:  # the continuation merged into the context's last token: score its own tokens
        alone = tokenizer.encode(continuation)
        whole, tail = context_ids + alone, len(alone)
    whole = whole[-max_len:]
    return whole, min(tail, len(whole) - 1)


@torch.no_grad()
def continuation_logprobs(ctx: EvalContext, sequences: list[tuple[list[int], int]]) -> list[float]:
    """Summed log-probability of each sequence's last `n` tokens given the tokens before them."""
    width = max(len(ids) for ids, _count in sequences)
    inputs = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, _n) in enumerate(sequences):
        inputs[row, :len(ids)] = torch.tensor(ids)
    logprobs = ctx.model.token_logprobs(inputs.to(ctx.device)).double().cpu()
    return [float(logprobs[row, len(ids) - 1 - n:len(ids) - 1].sum()) for row, (ids, n) in enumerate(sequences)]


def evaluate_choice(spec: TaskSpec, ctx: EvalContext) -> dict[str, float]:
    """acc, acc_norm, mean log-probability of the right answer, items scored and items excluded."""
    style = spec.get("style", "text")
    items = load_items(spec.path)
    shots = load_items(Path(spec.get("dev")))[:spec.get("shots", 0)] if spec.get("dev") else []
    kept = [item for item in items if same_task_key(item.question) not in ctx.exclude]
    excluded = len(items) - len(kept)
    kept = kept[:spec.get("limit")] if spec.get("limit") else kept
    sums = MetricSums(SUMS)
    computed = total = 0
    last = None
    with ctx.bar(spec.name, len(kept), "item") as bar:
        for index, batch in global_batches(kept, ctx.batch_size):
            total += 1
            if not ctx.owns(index):
                bar.update(len(batch))
                continue
            texts = [(context_text(item, shots, style), continuations(item, style)) for item in batch]
            last = [encode_pair(ctx.tokenizer, context, cont, ctx.max_seq_len)
                    for context, conts in texts for cont in conts]
            scores = continuation_logprobs(ctx, last)
            computed += 1
            for item, (_context, conts) in zip(batch, texts, strict=True):
                mine, scores = scores[:len(conts)], scores[len(conts):]
                # Per character of the choice itself, without the space that joins it to the prompt
                # (lm-evaluation-harness divides by len(choice); tests/test_eval_lm_harness.py).
                normed = [score / max(len(cont) - len(DELIMITER), 1) for score, cont in zip(mine, conts, strict=True)]
                sums.add("correct", int(max(range(len(mine)), key=mine.__getitem__) == item.answer))
                sums.add("correct_norm", int(max(range(len(normed)), key=normed.__getitem__) == item.answer))
                sums.add("gold_logprob", mine[item.answer])
                sums.add("items", 1)
            bar.update(len(batch))
    owed = ctx.owed_batches(total, computed)
    if owed and last is None:  # this rank owned no batch: build the first one to run in step
        batch = kept[:ctx.batch_size]
        last = [encode_pair(ctx.tokenizer, context_text(item, shots, style), cont, ctx.max_seq_len)
                for item in batch for cont in continuations(item, style)]
    for _owed in range(owed):
        continuation_logprobs(ctx, last)
    reduced = ctx.reduce(sums)
    count = max(reduced["items"], 1.0)
    return {"acc": reduced["correct"] / count, "acc_norm": reduced["correct_norm"] / count,
            "gold_logprob": reduced["gold_logprob"] / count, "items": int(reduced["items"]), "excluded": excluded}
