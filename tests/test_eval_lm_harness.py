"""Cross-check with a tool nobody here wrote: lm-evaluation-harness scores the Hugging Face export of a
model on a local multiple-choice file, and `launch/eval.py` must agree with it on the same items —
every choice's log-likelihood, `acc` and `acc_norm`.

Needs the optional `lm-eval[hf]` (and `transformers`); skipped with the reason when they are absent.
The harness runs offline: a local JSONL file through the `json` dataset builder, the model from a
directory.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from interop_models import random_model, save_model

from minigpt.cli import eval as eval_cli
from minigpt.evaluation.choice import (
    context_text,
    continuation_logprobs,
    continuations,
    encode_pair,
    load_items,
)
from minigpt.evaluation.context import EvalContext

pytestmark = pytest.mark.integration

QUESTIONS = [("Which is a colour?", ["red", "seven", "quickly", "dog"], "A"),
             ("Which is a number?", ["blue", "seven", "run", "cat"], "B"),
             ("Which is an animal?", ["green", "three", "slowly", "horse"], "D"),
             ("Which word is a verb?", ["yellow", "nine", "jump", "an enormous fish"], "C"),
             ("Which answer is the longest one?", ["a", "bb", "a much longer answer than the others", "dd"], "C"),
             ("天下大势，分久必合，下一句是?", ["合久必分", "你好", "世界和平", "学而时习之，不亦说乎"], "A")]


@pytest.fixture(scope="module")
def harness_and_items(tmp_path_factory, data_tokenizer):
    pytest.importorskip("transformers", reason="transformers (the `hf` extra) is not installed")
    pytest.importorskip("accelerate", reason="lm-eval's Hugging Face model needs accelerate (`lm-eval[hf]`)")
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (`lm-eval[hf]`) is not installed")
    from lm_eval.tasks import TaskManager

    from minigpt.interop.hf_llama import export_hf

    root = tmp_path_factory.mktemp("harness")
    model = random_model(data_tokenizer.vocab_size, seed=5)
    model_dir = save_model(root / "final", model, data_tokenizer)
    hf_dir = export_hf(model_dir, root / "hf")
    items = root / "mc.jsonl"
    items.write_text("".join(json.dumps({"question": q, **dict(zip("ABCD", choices, strict=True)), "answer": a},
                                        ensure_ascii=False) + "\n" for q, choices, a in QUESTIONS), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "minigpt_mc.yaml").write_text(textwrap.dedent(f"""\
        task: minigpt_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {items}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{[A, B, C, D]}}}}"
        doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """), encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_DATASETS_CACHE", str(root / "datasets_cache"))
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                          tasks=["minigpt_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                          device="cpu", batch_size=4, log_samples=True)
    return {"results": results, "items": items, "model": model, "model_dir": model_dir}


def test_every_choice_gets_the_same_log_likelihood_from_the_harness_and_from_us(harness_and_items, data_tokenizer):
    samples = sorted(harness_and_items["results"]["samples"]["minigpt_mc"], key=lambda s: s["doc_id"])
    items = load_items(harness_and_items["items"])
    assert len(samples) == len(items) == len(QUESTIONS)
    ctx = EvalContext(harness_and_items["model"], data_tokenizer, progress=False)
    for sample, item in zip(samples, items, strict=True):
        context = context_text(item, [], "text")
        conts = continuations(item, "text")
        # The harness asks for the same (context, continuation) pairs we score ...
        assert [tuple(argument[:2]) for argument in sample["arguments"]] == [(context, c) for c in conts]
        ours = continuation_logprobs(ctx, [encode_pair(data_tokenizer, context, c, ctx.max_seq_len) for c in conts])
        theirs = [float(response[0]) for response in sample["filtered_resps"]]
        # ... and gets the same log-likelihoods (fp32 models, different attention kernels).
        assert ours == pytest.approx(theirs, abs=1e-4), item.question


def test_accuracy_and_length_normalised_accuracy_agree_with_the_harness(harness_and_items, tmp_path):
    out = tmp_path / "results.json"
    assert eval_cli.main(["--model", str(harness_and_items["model_dir"]), "--task", f"mc:{harness_and_items['items']}",
                          "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    ours = json.loads(out.read_text())
    ours = next(iter(ours["tasks"].values())) if "tasks" in ours else ours
    ours = ours.get("metrics", ours)
    theirs = harness_and_items["results"]["results"]["minigpt_mc"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
