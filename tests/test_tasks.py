"""Verifiable tasks: deterministic, correctly answered, with wrong answers the checker rejects."""

from __future__ import annotations

import json

import pytest

from minigpt.cli import make_tasks
from minigpt.data.build import build_dataset
from minigpt.data.datasets import DPOPairs, RLHFPrompts, SFTExamples
from minigpt.data.shards import open_shard
from minigpt.data.tasks import check_answer, generate_tasks, reward, solve


def test_generation_is_deterministic_and_cycles_through_tasks():
    records = generate_tasks(30, seed=3)
    assert records == generate_tasks(30, seed=3) and records != generate_tasks(30, seed=4)
    assert [r["task"] for r in records[:3]] == ["add", "reverse", "sort"]
    with pytest.raises(ValueError, match="unknown task"):
        generate_tasks(3, tasks=("divide",))


def test_references_are_correct_and_wrong_answers_are_wrong():
    for record in generate_tasks(300, seed=0):
        assert check_answer(record, record["reference"]) and check_answer(record["prompt"], f" {record['reference']}\n")
        assert record["wrong"] != record["reference"] and not check_answer(record["prompt"], record["wrong"])
        assert len(record["reference"]) <= 5


def test_solver_and_reward():
    assert solve("Add 27+45") == "72" and solve("Reverse cabd") == "dbac" and solve("Sort dbca") == "abcd"
    assert solve("What is love?") is None
    assert reward("Add 27+45", "72") == 1.0 and reward("Add 27+45", "73") == 0.25
    assert reward("Add 27+45", "73", partial=False) == 0.0 and reward("Sort dbca", "xyz") == 0.0
    with pytest.raises(ValueError, match="not a verifiable task"):
        check_answer("What is love?", "baby don't hurt me")


def test_task_files_build_into_every_kind_and_rlhf_records_check(tmp_path, data_tokenizer):
    assert make_tasks.main(["--out", str(tmp_path / "tasks"), "--count", "30", "--seed", "1"]) == 0
    datasets = {kind: build_dataset([tmp_path / "tasks" / f"{kind}.jsonl"], tmp_path / kind, data_tokenizer,
                                    kind=kind, val_fraction=0.1, progress=False) for kind in ("sft", "dpo", "rlhf")}
    assert len(SFTExamples(open_shard(datasets["sft"]), 32, 0)) == 27
    assert len(DPOPairs(open_shard(datasets["dpo"]), 32, 0)) == 27
    prompts = RLHFPrompts(open_shard(datasets["rlhf"], kind="rlhf"))
    for index in range(len(prompts)):
        record = prompts.record(index)
        assert check_answer(record, record["reference"]) and reward(record, "zzzzzz") == 0.0


def test_chinese_prompts_ask_the_same_tasks_and_are_checked_alike():
    from minigpt.data.tasks import phrase, solve, task_of

    assert solve("计算 27+45") == "72" and solve("倒序写出 cabd") == "dbac" and solve("按字母排序 dbca") == "abcd"
    assert [task_of(p) for p in ("计算 1+2", "Reverse ab", "按字母排序 ba", "床前明月光")] == ["add", "reverse",
                                                                                              "sort", None]
    english = generate_tasks(30, seed=4)
    chinese = generate_tasks(30, seed=4, language="zh")
    assert [phrase(r["prompt"], "zh") for r in english] == [r["prompt"] for r in chinese]
    assert [r["reference"] for r in english] == [r["reference"] for r in chinese]
    assert all(check_answer(r, r["reference"]) and not check_answer(r, r["wrong"]) for r in chinese)
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        generate_tasks(1, language="fr")


def test_make_tasks_writes_chinese_prompts_readably(tmp_path):
    from minigpt.cli import make_tasks

    assert make_tasks.main(["--out", str(tmp_path), "--count", "6", "--language", "zh"]) == 0
    lines = (tmp_path / "rlhf.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["prompt"].startswith("计算 ") and "计算" in lines[0]  # not \\u escapes


def test_make_tasks_with_an_unknown_task_leaves_no_output_directory(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert make_tasks.main(["--out", str(out), "--tasks", "add,multiply"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not out.exists()
