"""launch/eval.py and minigpt.evaluation: bits per byte, multiple choice, verifiable tasks, held-out sets.

Numbers are checked against direct computations with the model (a 2-layer model, random weights:
what is under test is the scoring, not the model's skill); a task file whose references are the
model's own greedy answers for some prompts pins exact match to a known value.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from model_factory import seeded_model, small_test_config

from minigpt.cli import eval as eval_cli
from minigpt.cli import make_tasks
from minigpt.data.demo import demo_post_training_records
from minigpt.data.tasks import generate_tasks, phrase, read_prompts, same_task_key
from minigpt.evaluation.bpb import evaluate_bpb
from minigpt.evaluation.choice import context_text, continuations, encode_pair, evaluate_choice, load_items
from minigpt.evaluation.context import EvalContext, EvalDataError
from minigpt.evaluation.spec import TaskSpecError, parse_task_spec
from minigpt.evaluation.verifiable import evaluate_tasks
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.metrics import token_byte_lengths
from minigpt.weights import save_consolidated

DOCUMENTS = ["The module defines a class.", "It returns a list of names.", "学而时习之，不亦说乎？"]
QUESTIONS = [("Which is a colour?", ["red", "seven", "quickly", "dog"], "A"),
             ("Which is a number?", ["blue", "seven", "run", "cat"], "B"),
             ("Which is an animal?", ["green", "three", "slowly", "horse"], "D"),
             ("Which is a verb?", ["yellow", "nine", "jump", "fish"], "C"),
             ("天下大势?", ["分久必合", "合久必分", "你好", "世界"], "B")]


@pytest.fixture(scope="module")
def model(data_tokenizer):
    return seeded_model(small_test_config(data_tokenizer.vocab_size), seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, data_tokenizer):
    return save_consolidated(tmp_path_factory.mktemp("eval") / "final", model.state_dict(), model.config,
                             data_tokenizer.directory)


def context(model, tokenizer, **options) -> EvalContext:
    return EvalContext(model, tokenizer, progress=False, **options)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_task_entries_parse_with_typed_options_and_bad_ones_are_named():
    spec = parse_task_spec("mc:data/ceval.jsonl,dev=data/dev.jsonl,shots=5,style=letter")
    assert (spec.kind, str(spec.path), spec.options) == ("mc", "data/ceval.jsonl",
                                                         {"dev": "data/dev.jsonl", "shots": 5, "style": "letter"})
    assert spec.name == "mc:ceval.jsonl" and parse_task_spec("bpb:x.txt,name=val").name == "val"
    for entry, message in [("ppl:x.txt", "KIND one of"), ("bpb:", "no path"), ("bpb:x.txt,shots=2", "not an option"),
                           ("tasks:x.jsonl,max_new_tokens=many", "integer"), ("mc:x.jsonl,shots=3", "dev=PATH"),
                           ("mc:x.jsonl,style=cloze", "style")]:
        with pytest.raises(TaskSpecError, match=message):
            parse_task_spec(entry)


def test_bpb_predicts_every_token_after_the_first_once_with_training_byte_counts(tmp_path, model, data_tokenizer):
    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    stream = [data_tokenizer.eos_id]
    for document in DOCUMENTS:
        stream += data_tokenizer.encode(document) + [data_tokenizer.eos_id]
    assert len(stream) <= model.config.max_seq_len  # one window: the direct computation sees the same context
    ids = torch.tensor([stream])
    nats = F.cross_entropy(model(ids[:, :-1])[0].float(), ids[0, 1:], reduction="sum").item()
    byte_count = token_byte_lengths(data_tokenizer)[ids[0, 1:]].sum().item()
    result = evaluate_bpb(parse_task_spec(f"bpb:{text}"), context(model, data_tokenizer))
    assert result["tokens"] == len(stream) - 1 and result["bytes"] == byte_count
    assert byte_count == sum(len(d.encode()) for d in DOCUMENTS)  # bits per byte of the UTF-8 text itself
    assert result["nats_per_token"] == pytest.approx(nats / (len(stream) - 1), rel=1e-6)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / byte_count, rel=1e-6)
    # The same text as .txt paragraphs, in short windows and odd batches: the same tokens, a shorter context.
    plain = tmp_path / "docs.txt"
    plain.write_text("\n\n".join(DOCUMENTS) + "\n", encoding="utf-8")
    short = evaluate_bpb(parse_task_spec(f"bpb:{plain},seq_len=5"), context(model, data_tokenizer, batch_size=3))
    assert (short["tokens"], short["bytes"]) == (result["tokens"], result["bytes"])
    capped = evaluate_bpb(parse_task_spec(f"bpb:{plain},seq_len=5,max_tokens=12"), context(model, data_tokenizer))
    assert capped["tokens"] == 12


def test_bpb_reads_a_shard_directory_like_the_text_it_was_built_from(tmp_path, model, data_tokenizer):
    from minigpt.data.build import build_dataset

    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    shards = build_dataset([text], tmp_path / "shards", data_tokenizer, kind="pretrain", val_fraction=0.0,
                           seed=0, progress=False)
    from_text = evaluate_bpb(parse_task_spec(f"bpb:{text}"), context(model, data_tokenizer))
    from_shard = evaluate_bpb(parse_task_spec(f"bpb:{shards},split=train"), context(model, data_tokenizer))
    assert from_shard["tokens"] == from_text["tokens"] and from_shard["bytes"] == from_text["bytes"]


def mc_records():
    return [{"question": q, **dict(zip("ABCD", c, strict=True)), "answer": a} for q, c, a in QUESTIONS]


@pytest.mark.parametrize("style", ["text", "letter"])
def test_multiple_choice_picks_the_most_likely_choice_raw_and_per_character(tmp_path, model, data_tokenizer, style):
    items_path = write_jsonl(tmp_path / "val.jsonl", mc_records())
    dev = write_jsonl(tmp_path / "dev.jsonl", mc_records()[:2])
    spec = parse_task_spec(f"mc:{items_path},dev={dev},shots=2,style={style}")
    result = evaluate_choice(spec, context(model, data_tokenizer, batch_size=2))
    # The reference: each choice scored alone, by the model's own token log-probabilities.
    shots, correct, correct_norm, gold = load_items(dev), 0, 0, 0.0
    for item in load_items(items_path):
        scores = []
        for cont in continuations(item, style):
            ids, n = encode_pair(data_tokenizer, context_text(item, shots, style), cont, model.config.max_seq_len)
            with torch.no_grad():
                scores.append(model.token_logprobs(torch.tensor([ids]))[0, -n:].double().sum().item())
        # per character of the choice, without the space joining it to the prompt (as the harness does)
        normed = [s / len(c.removeprefix(' ')) for s, c in zip(scores, continuations(item, style), strict=True)]
        correct += scores.index(max(scores)) == item.answer
        correct_norm += normed.index(max(normed)) == item.answer
        gold += scores[item.answer]
    assert result["items"] == len(QUESTIONS) and result["excluded"] == 0
    assert result["acc"] == correct / len(QUESTIONS) and result["acc_norm"] == correct_norm / len(QUESTIONS)
    assert result["gold_logprob"] == pytest.approx(gold / len(QUESTIONS), rel=1e-5)


def test_multiple_choice_reads_ceval_cmmlu_and_mmlu_layouts_and_names_bad_items(tmp_path):
    ceval = tmp_path / "ceval_val.csv"  # C-Eval: id,question,A,B,C,D,answer,explanation
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,天下大势?,分久必合,合久必分,你好,世界,B,\n",
                     encoding="utf-8")
    cmmlu = tmp_path / "cmmlu.csv"  # CMMLU: an unnamed index column, capitalised Question/Answer
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,天下大势?,分久必合,合久必分,你好,世界,B\n", encoding="utf-8")
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "天下大势?", "subject": "x",  # MMLU's Hub layout
                                                  "choices": ["分久必合", "合久必分", "你好", "世界"], "answer": 1}])
    assert load_items(ceval) == load_items(cmmlu) == load_items(mmlu) and load_items(ceval)[0].answer == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [mc_records()[0], {"question": "q", "A": "x", "B": "y", "answer": "C"}])
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: field 'answer' must be one of the choice letters AB"):
        load_items(bad)


def test_tasks_exact_match_counts_the_models_greedy_answers_and_leaves_out_training_prompts(
        tmp_path, model, data_tokenizer):
    prompts = [t["prompt"] for t in generate_tasks(8, seed=5, tasks=("sort", "reverse"))]
    generator = TextGenerator(model, data_tokenizer)
    answers = [generator.generate([p], GenerationConfig(max_new_tokens=6, do_sample=False), chat=True)[0]
               for p in prompts]
    # References: the model's own answer for the first 4 prompts, a wrong one for the rest.
    records = [{"prompt": p, "reference": a.strip() if i < 4 else a.strip() + "x", "task": p.split()[0].lower()}
               for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    tasks = write_jsonl(tmp_path / "heldout.jsonl", records)
    training = write_jsonl(tmp_path / "train.jsonl", [{"conversations": [{"role": "user", "content": prompts[0]},
                                                                         {"role": "assistant", "content": "x"}]},
                                                      {"prompt": phrase(prompts[7], "zh"), "chosen": "a",  # 倒序写出 ..
                                                       "rejected": "b"}])
    spec = parse_task_spec(f"tasks:{tasks},max_new_tokens=6")
    for lockstep in (False, True):  # lockstep decodes the whole budget; the answers are the same
        result = evaluate_tasks(spec, context(model, data_tokenizer, batch_size=5, lockstep=lockstep,
                                              exclude=frozenset(read_prompts([training]))))
        assert (result["items"], result["excluded"]) == (6, 2)
        assert result["exact_match"] == pytest.approx(3 / 6)
        assert result["items"] * result["reward"] >= 3


def test_make_tasks_exclude_from_writes_a_held_out_set_disjoint_from_training(tmp_path):
    train = tmp_path / "train"
    assert make_tasks.main(["--out", str(train), "--count", "3000", "--seed", "0", "--tasks", "sort,reverse"]) == 0
    # Without --exclude-from the draw is unchanged (training data of earlier runs stays reproducible)...
    overlapping = generate_tasks(300, seed=987, tasks=("sort", "reverse"))
    seen = read_prompts([train / "sft.jsonl"])
    assert any(t["prompt"] in seen for t in overlapping)
    # ...with it, no prompt of the training file and none twice.
    assert make_tasks.main(["--out", str(tmp_path / "heldout"), "--count", "300", "--seed", "987",
                            "--tasks", "sort,reverse", "--exclude-from", str(train / "sft.jsonl")]) == 0
    heldout = [json.loads(line)["prompt"] for line in (tmp_path / "heldout" / "rlhf.jsonl").read_text().splitlines()]
    assert len(heldout) == len(set(heldout)) == 300 and not set(heldout) & seen


def test_a_held_out_set_is_disjoint_from_training_in_both_languages(tmp_path):
    """`计算 27+45` asks what `Add 27+45` asks: a Chinese held-out set drawn against bilingual training data
    contains no training question in either phrasing, and eval's --exclude-from leaves such a prompt out."""
    training = write_jsonl(tmp_path / "sft.jsonl", demo_post_training_records("sft", count=3000))
    seen = read_prompts([training])
    assert any(key.startswith("Add ") for key in seen) and not any(key.startswith("计算") for key in seen)
    assert make_tasks.main(["--out", str(tmp_path / "heldout"), "--count", "300", "--seed", "987",
                            "--language", "zh", "--exclude-from", str(training)]) == 0
    heldout = [json.loads(line)["prompt"] for line in (tmp_path / "heldout" / "rlhf.jsonl").read_text().splitlines()]
    assert all(prompt.split(" ")[0] in ("计算", "倒序写出", "按字母排序") for prompt in heldout)
    assert len({same_task_key(p) for p in heldout}) == 300 and not {same_task_key(p) for p in heldout} & seen
    assert same_task_key(" 计算 27+45 ") == same_task_key("Add 27+45") == "Add 27+45"
    assert same_task_key(" 你好 ") == "你好"


def test_eval_command_prints_a_table_writes_json_and_refuses_bad_input(tmp_path, model_dir, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    items = write_jsonl(tmp_path / "mc.jsonl", mc_records())
    out = tmp_path / "results.json"
    assert eval_cli.main(["--model", str(model_dir.parent), "--task", f"bpb:{docs}", "--task", f"mc:{items}",
                          "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "bpb:docs.jsonl" in printed and "acc_norm" in printed
    document = json.loads(out.read_text())
    assert set(document["tasks"]) == {"bpb:docs.jsonl", "mc:mc.jsonl"}
    assert document["tasks"]["mc:mc.jsonl"]["metrics"]["items"] == len(QUESTIONS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "A": "x"}])
    for argv, message in [(["--task", f"mc:{bad}"], "bad.jsonl:1: needs choice fields A and B"),
                          (["--task", f"tasks:{tmp_path / 'missing.jsonl'}"], "missing.jsonl does not exist"),
                          (["--task", f"mc:{items}", "--exclude-from", str(tmp_path / "nope.jsonl")], "nope.jsonl")]:
        assert eval_cli.main(["--model", str(model_dir), "--no-progress", *argv]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error:") and message in error, error
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", str(model_dir), "--task", "bleu:x.txt"])
    assert exit_info.value.code == 2


def malformed_task_files(tmp_path):
    """(--task entry, what its one error line must say) for files a user could hand over by mistake."""
    item = {"question": "q", "A": "a", "B": "b", "answer": "A"}
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(item) + "\n" + '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    deep_tasks = tmp_path / "deep_tasks.jsonl"
    deep_tasks.write_text('{"prompt": "Sort dbca"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    wide = tmp_path / "wide.csv"
    wide.write_text("question,A,B,answer\nq,a,b,A\n" + "x" * 200_000 + ",a,b,A\n", encoding="utf-8")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(item).encode() + b'\n{"question": "caf\xe9", "A": "a", "B": "b", "answer": "A"}\n')
    latin_csv = tmp_path / "latin.csv"
    latin_csv.write_bytes(b"question,A,B,answer\nq,a,b,A\nq,caf\xe9,b,A\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("question,A,B,answer\n")
    (tmp_path / "empty_tasks.jsonl").write_text("\n")
    return [(f"mc:{deep}", f"{deep}:2: JSON nested too deeply"),
            (f"tasks:{deep_tasks}", f"{deep_tasks}:2: JSON nested too deeply"),
            (f"mc:{wide}", f"{wide}:3: field 'question' is 200,000 characters long"),
            (f"mc:{latin}", f"{latin}:2: field 'question' is not valid UTF-8"),
            (f"mc:{latin_csv}", f"{latin_csv}:3: field 'A' is not valid UTF-8"),
            (f"mc:{tmp_path / 'empty.jsonl'}", "empty.jsonl: no items"),
            (f"mc:{tmp_path / 'header.csv'}", "header.csv: no items"),
            (f"tasks:{tmp_path / 'empty_tasks.jsonl'}", "empty_tasks.jsonl: no tasks")]


def test_eval_refuses_malformed_or_empty_task_files_in_one_line_naming_file_line_and_field(
        tmp_path, model_dir, capsys):
    for task, message in malformed_task_files(tmp_path):
        assert eval_cli.main(["--model", str(model_dir), "--no-progress", "--task", task]) == 2, task
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
        assert "acc" not in captured.out


def test_excluded_training_files_that_are_malformed_are_named_too(tmp_path, model_dir, capsys):
    items = write_jsonl(tmp_path / "mc.jsonl", mc_records())
    for name, content, message in [("deep.jsonl", b"[" * 100_000 + b"]" * 100_000, "deep.jsonl:1: JSON nested"),
                                   ("latin.jsonl", b'{"prompt": "caf\xe9"}', "latin.jsonl:1: field 'prompt'")]:
        (tmp_path / name).write_bytes(content + b"\n")
        assert eval_cli.main(["--model", str(model_dir), "--no-progress", "--task", f"mc:{items}",
                              "--exclude-from", str(tmp_path / name)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, error


@pytest.fixture(scope="module")
def trained_with_eval_tasks(tmp_path_factory, shards, data_tokenizer):
    """A 2-step pretraining run (2-layer model) evaluating a bpb task and a tasks task at each evaluation."""
    import dataclasses

    from minigpt.config import PRESETS, TrainConfig
    from minigpt.train.loop import Trainer

    root = tmp_path_factory.mktemp("train_eval")
    docs = write_jsonl(root / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    tasks = write_jsonl(root / "heldout.jsonl", generate_tasks(5, seed=1, tasks=("sort",)))
    small = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                ffn_hidden_size=64, max_seq_len=64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny", small)
        cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], tokenizer=str(data_tokenizer.directory),
                          out=str(root / "run"), seq_len=32, batch_size=4, max_steps=2, warmup_steps=1,
                          eval_interval=1, eval_batches=1, log_interval=100, sample_prompt="a",
                          eval_task=[f"bpb:{docs}", f"tasks:{tasks},max_new_tokens=4,name=sort"])
        assert Trainer(cfg).run() == 0
    return root


@pytest.mark.integration
def test_training_eval_task_is_logged_at_each_evaluation_and_matches_the_eval_command(trained_with_eval_tasks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = trained_with_eval_tasks
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    assert {"bpb:docs.jsonl/bpb", "bpb:docs.jsonl/tokens", "sort/exact_match", "sort/items"} <= set(evals[-1])
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/bpb:docs.jsonl/bpb")] == [0, 1]
    # The last evaluation saw the final weights: the eval command on final/ gives the same numbers.
    out = root / "standalone.json"
    assert eval_cli.main(["--model", str(root / "run"), "--task", f"bpb:{root / 'docs.jsonl'}", "--batch-size", "4",
                          "--out", str(out), "--no-progress"]) == 0
    standalone = json.loads(out.read_text())["tasks"]["bpb:docs.jsonl"]["metrics"]
    assert evals[-1]["bpb:docs.jsonl/bpb"] == pytest.approx(standalone["bpb"], rel=1e-6)


def test_training_refuses_an_eval_task_before_training_when_its_file_is_missing(tmp_path):
    from minigpt.config import ConfigError, TrainConfig
    from minigpt.train.loop import Trainer

    with pytest.raises(ConfigError, match="--eval-task bpb:"):
        TrainConfig.of(eval_task=["bpb:x.txt,shots=1"])
    with pytest.raises(ConfigError, match="missing.txt does not exist"):
        Trainer(TrainConfig.of(out=str(tmp_path / "run"), eval_task=[f"bpb:{tmp_path / 'missing.txt'}"]))
    assert not (tmp_path / "run").exists()


def test_training_refuses_an_eval_task_file_without_usable_items_before_training(tmp_path):
    """Found at the first evaluation, an empty or malformed task file would stop the run steps in; it is read
    before anything is trained or written instead."""
    from minigpt.config import TrainConfig
    from minigpt.train.loop import Trainer

    (tmp_path / "header.csv").write_text("question,A,B,answer\n")
    (tmp_path / "tasks.jsonl").write_bytes(b'{"prompt": "Sort \xff"}\n')
    for entry, message in [(f"mc:{tmp_path / 'header.csv'}", "header.csv: no items"),
                           (f"tasks:{tmp_path / 'tasks.jsonl'}", "tasks.jsonl:1: field 'prompt' is not valid UTF-8")]:
        with pytest.raises(EvalDataError, match=message):
            Trainer(TrainConfig.of(out=str(tmp_path / "run"), eval_task=[entry]))
        assert not (tmp_path / "run").exists()


def test_repeated_eval_task_flags_add_up_instead_of_replacing_each_other():
    from minigpt.cli.train import build_parser

    args = build_parser().parse_args(["--eval-task", "bpb:a.txt", "--eval-task", "tasks:b.jsonl", "mc:c.jsonl"])
    assert args.eval_task == ["bpb:a.txt", "tasks:b.jsonl", "mc:c.jsonl"]
    assert build_parser().parse_args([]).eval_task == []


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, shards, data_tokenizer):
    """A 2-rank ZeRO-3 training run with eval tasks; then `launch/eval.py` on its final/ weights on one process
    and under `deepspeed --num_gpus 2`. Returns the last logged eval row and each evaluation's results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ports import free_port, run_launch

    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("zero3_eval")
    repo = Path(__file__).resolve().parents[1]
    # 5 prompts, 7 windows, 5 items in batches of 2: the ranks own 3/2, 4/3, 2/1 batches (uneven on purpose).
    tasks = write_jsonl(root / "tasks.jsonl", generate_tasks(5, seed=4, tasks=("sort", "reverse")))
    docs = write_jsonl(root / "docs.jsonl", [{"text": d} for d in DOCUMENTS * 2])
    items = write_jsonl(root / "mc.jsonl", mc_records())
    entries = [f"tasks:{tasks},max_new_tokens=4", f"bpb:{docs},seq_len=16", f"mc:{items},style=letter"]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def run(cmd, retry=False):  # only a read-only launch (eval) may be run again after a rank's abort
        done = (run_launch if retry else subprocess.run)(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                                                         env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def deepspeed():
        return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]

    run([*deepspeed(), str(repo / "launch" / "train.py"), "--config", "tiny", "--seq-len", "32", "--batch-size", "2",
         "--max-steps", "2", "--warmup-steps", "1", "--eval-interval", "0", "--eval-batches", "1", "--data", str(shards),
         "--tokenizer", str(data_tokenizer.directory), "--out", str(root / "run"), "--dist-timeout", "120",
         "--ds-config", str(repo / "ds_configs" / "zero3.json"), "--eval-task", *entries])
    logged = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    results = {"logged": [r for r in logged if r.get("split") == "eval"][-1]}
    evaluate = [str(repo / "launch" / "eval.py"), "--model", str(root / "run"), "--batch-size", "2", "--no-progress",
                *[arg for entry in entries for arg in ("--task", entry)]]
    for ranks, launcher in [(1, [sys.executable]), (2, deepspeed())]:
        run([*launcher, *evaluate, "--out", str(root / f"ranks{ranks}.json")], retry=ranks > 1)
        document = json.loads((root / f"ranks{ranks}.json").read_text())
        assert document["world_size"] == ranks
        results[ranks] = {name: task["metrics"] for name, task in document["tasks"].items()}
    return results


@pytest.mark.integration
@pytest.mark.deepspeed
def test_two_rank_deepspeed_evaluation_gives_the_numbers_of_one_rank(zero3_run):
    """Real `deepspeed --num_gpus 2 launch/eval.py` (CPU, gloo) against one process: the same numbers."""
    assert zero3_run[2]["tasks:tasks.jsonl"]["items"] == 5 and zero3_run[2]["mc:mc.jsonl"]["items"] == len(QUESTIONS)
    assert zero3_run[2]["bpb:docs.jsonl"]["tokens"] > 16 * 4
    for name, metrics in zero3_run[1].items():
        for metric, value in metrics.items():
            assert zero3_run[2][name][metric] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, metric)


@pytest.mark.integration
@pytest.mark.deepspeed
def test_zero3_training_runs_eval_tasks_in_lockstep_with_the_numbers_of_the_eval_command(zero3_run):
    """ZeRO-3 gathers weights collectively in every forward pass: ranks owning unequal numbers of batches still
    run the same passes (else the run would hang until --dist-timeout); the last evaluation saw the final
    weights, so it reports what the eval command reports on final/."""
    for task, metrics in zero3_run[1].items():
        for metric, value in metrics.items():
            assert zero3_run["logged"][f"{task}/{metric}"] == pytest.approx(value, rel=1e-5), (task, metric)


def test_tasks_scores_sft_records_by_their_closing_answer_grouped_by_kind(tmp_path, model, data_tokenizer):
    from minigpt.evaluation.verifiable import answer_budget, load_tasks

    questions = ["床前？", "举头？", "Add 2+3"]
    generator = TextGenerator(model, data_tokenizer)
    answers = [generator.generate([q], GenerationConfig(max_new_tokens=8, do_sample=False), chat=True)[0].strip()
               for q in questions]
    records = [{"conversations": [{"role": "user", "content": questions[0]},
                                  {"role": "assistant", "content": answers[0]}], "kind": "poem"},
               {"conversations": [{"role": "system", "content": "诗"},
                                  {"role": "user", "content": questions[1]},
                                  {"role": "assistant", "content": answers[1] + "霜"}], "kind": "poem"},
               {"conversations": [{"role": "user", "content": questions[2]},
                                  {"role": "assistant", "content": "5"}]}]
    path = write_jsonl(tmp_path / "poems.jsonl", records)
    loaded = load_tasks(path)
    assert [r["task"] for r in loaded] == ["poem", "poem", "add"]
    assert loaded[1]["reference"] == answers[1] + "霜" and loaded[1]["context"][0]["role"] == "system"
    # The answer budget: as given, else the longest reference's tokens and one for the end of the turn.
    longest = max(len(data_tokenizer.encode(r["reference"])) for r in loaded)
    assert answer_budget(parse_task_spec(f"tasks:{path}"), [r["reference"] for r in loaded], data_tokenizer) \
        == longest + 1
    result = evaluate_tasks(parse_task_spec(f"tasks:{path},max_new_tokens=8"),
                            context(model, data_tokenizer, batch_size=2))
    # The first reference is the model's own greedy answer; the second asks for one character more.
    assert result["exact_match/poem"] == pytest.approx(0.5)
    assert result["items"] == 3
