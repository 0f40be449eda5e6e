"""Exact match and reward on verifiable tasks (`data_tools/make_tasks.py` files, or any records with a reference:
a "reference" field or, in SFT format, the closing assistant turn), greedy, chat template.

Each prompt is asked as one user turn of the chat template (an SFT record: its turns before the answer); the
greedy answer (up to `max_new_tokens`, by default the longest reference's tokens plus one, ended by
<|im_end|> or EOS) is checked by `minigpt.data.tasks`: `exact_match` is the share of right
answers, `reward` the mean task reward (partial credit for a same-length answer unless `partial=false`),
both also per task type (`exact_match/sort`, ...). Prompts that occur in the training files given to
`--exclude-from`, in either language (`计算 27+45` is `Add 27+45`), are left out and counted (`excluded`).
"""

from __future__ import annotations

from pathlib import Path

from minigpt.data.tasks import expected_answer, final_answer, prompt_of, reward, same_task_key, task_of
from minigpt.evaluation.context import EvalContext, EvalDataError, global_batches, jsonl_objects
from minigpt.evaluation.spec import TaskSpec
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _
from minigpt.metrics import MetricSums


def load_tasks(path: Path) -> list[dict]:
    """Records {"prompt", "context", "reference", "task"} of a task file: make_tasks formats (sft, dpo, rlhf),
    records with a "reference", or conversations (SFT format) whose closing assistant turn is the reference
    and whose earlier turns are the context it answers. Grouped by a "task" or "kind" field, else by the
    task type the prompt asks for ("other" when it is none of make_tasks')."""
    records = []
    for number, record in jsonl_objects(path):
        prompt = prompt_of(record).strip()
        reference = expected_answer(record) if prompt else None
        if reference is None:
            raise EvalDataError(_("{path}:{line}: not a verifiable task (no prompt with a known answer, 'reference' "
                                  "field, or closing assistant turn)").format(path=path, line=number))
        messages = record.get("messages") or record.get("conversations")
        context = (messages[:-1] if final_answer(record) is not None and "reference" not in record
                   else [{"role": "user", "content": prompt}])
        group = record.get("task") or record.get("kind") or task_of(prompt) or "other"
        records.append({"prompt": prompt, "context": context, "reference": reference, "task": str(group)})
    if not records:
        raise EvalDataError(_("{path}: no tasks (the file is empty)").format(path=path))
    return records


def answer_budget(spec: TaskSpec, references: list[str], tokenizer) -> int:
    """`max_new_tokens` as given, else room for the longest reference and the end-of-turn token."""
    if spec.get("max_new_tokens") is not None:
        return spec.get("max_new_tokens")
    return max((len(tokenizer.encode(reference)) for reference in references), default=0) + 1


def evaluate_tasks(spec: TaskSpec, ctx: EvalContext) -> dict[str, float]:
    """exact_match and reward overall and per task type, items scored and items excluded."""
    records = load_tasks(spec.path)
    kept = [r for r in records if same_task_key(r["prompt"]) not in ctx.exclude]
    excluded = len(records) - len(kept)
    kept = kept[:spec.get("limit")] if spec.get("limit") else kept
    tokenizer = ctx.tokenizer
    prompts = [tokenizer.encode_chat(r["context"], add_generation_prompt=True).ids for r in kept]
    longest = max((len(p) for p in prompts), default=0)
    max_new = min(answer_budget(spec, [r["reference"] for r in kept], tokenizer), ctx.max_seq_len - longest)
    if kept and max_new < 1:
        raise EvalDataError(_("{task}: a prompt of {tokens} tokens leaves no room to answer within the model's "
                              "max_seq_len {max_seq_len}").format(task=spec.text, tokens=longest,
                                                                  max_seq_len=ctx.max_seq_len))
    kinds = sorted({r["task"] for r in kept})
    sums = MetricSums(["correct", "reward", "items"] + [f"{m}/{k}" for k in kinds for m in ("correct", "reward",
                                                                                                "items")])
    # In lockstep every rank decodes exactly max_new steps (no early stop), so forward passes match.
    stops = set(tokenizer.stop_ids)
    config = GenerationConfig(max_new_tokens=max(max_new, 1), do_sample=False,
                              stop_token_ids=() if ctx.lockstep else None)
    generator = TextGenerator(ctx.model, tokenizer, ctx.device)
    partial = spec.get("partial", True)
    computed = total = 0
    batches = list(global_batches(list(range(len(kept))), ctx.batch_size))
    with ctx.bar(spec.name, len(kept), "prompt") as bar:
        for index, rows in batches:
            total += 1
            if ctx.owns(index):
                sequences = generator.generate_sequences([prompts[i] for i in rows], config)
                computed += 1
                for i, sequence in zip(rows, sequences, strict=True):
                    ids = sequence.token_ids
                    cut = next((n for n, t in enumerate(ids) if t in stops), len(ids))
                    answer = tokenizer.decode(ids[:cut])
                    score = reward(kept[i], answer, partial=partial)
                    for suffix in ("", f"/{kept[i]['task']}"):
                        sums.add("correct" + suffix, float(score == 1.0))
                        sums.add("reward" + suffix, score)
                        sums.add("items" + suffix, 1)
            bar.update(len(rows))
    for _owed in range(ctx.owed_batches(total, computed)):
        generator.generate_sequences([prompts[i] for i in batches[-1][1]], config)
    reduced = ctx.reduce(sums)
    results = {"exact_match": reduced["correct"] / max(reduced["items"], 1.0),
               "reward": reduced["reward"] / max(reduced["items"], 1.0),
               "items": int(reduced["items"]), "excluded": excluded}
    for kind in kinds:
        count = max(reduced[f"items/{kind}"], 1.0)
        results[f"exact_match/{kind}"] = reduced[f"correct/{kind}"] / count
        results[f"reward/{kind}"] = reduced[f"reward/{kind}"] / count
    return results
