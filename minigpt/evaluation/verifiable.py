"""Exact match and reward on the verifiable tasks (`data_tools/make_tasks.py` files), greedy, chat template.

Each prompt is asked as one user turn of the chat template; the greedy answer (up to `max_new_tokens`,
ended by <|im_end|> or EOS) is checked by `minigpt.data.tasks`: `exact_match` is the share of right
answers, `reward` the mean task reward (partial credit for a same-length answer unless `partial=false`),
both also per task type (`exact_match/sort`, ...). Prompts that occur in the training files given to
`--exclude-from` are left out and counted (`excluded`).
"""

from __future__ import annotations

from pathlib import Path

from minigpt.data.tasks import expected_answer, prompt_of, reward
from minigpt.evaluation.context import EvalContext, EvalDataError, global_batches, jsonl_objects
from minigpt.evaluation.spec import TaskSpec
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.train.metrics import MetricSums


def load_tasks(path: Path) -> list[dict]:
    """Records {"prompt", "reference", "task"} of a task file in any make_tasks format (sft, dpo, rlhf)."""
    records = []
    for number, record in jsonl_objects(path):
        prompt = prompt_of(record).strip()
        reference = expected_answer(record) if prompt else None
        if reference is None:
            raise EvalDataError(f"{path}:{number}: not a verifiable task (no prompt with a known answer or "
                                "'reference' field)")
        records.append({"prompt": prompt, "reference": reference,
                        "task": str(record.get("task") or prompt.split(" ", 1)[0].lower())})
    if not records:
        raise EvalDataError(f"{path}: no tasks (the file is empty)")
    return records


def evaluate_tasks(spec: TaskSpec, ctx: EvalContext) -> dict[str, float]:
    """exact_match and reward overall and per task type, items scored and items excluded."""
    records = load_tasks(spec.path)
    kept = [r for r in records if r["prompt"] not in ctx.exclude]
    excluded = len(records) - len(kept)
    kept = kept[:spec.get("limit")] if spec.get("limit") else kept
    tokenizer = ctx.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True).ids
               for r in kept]
    longest = max((len(p) for p in prompts), default=0)
    max_new = min(spec.get("max_new_tokens", 16), ctx.max_seq_len - longest)
    if kept and max_new < 1:
        raise EvalDataError(f"{spec.text}: a prompt of {longest} tokens leaves no room to answer within the "
                            f"model's max_seq_len {ctx.max_seq_len}")
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
    for _ in range(ctx.owed_batches(total, computed)):
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
