"""Building datasets: deterministic splits, stats per file, each bad input counted or fatal under strict."""

from __future__ import annotations

import gzip
import json
import os
import stat
from collections import Counter

import pytest
from conftest import shared_file

from minigpt.cli import pretokenize
from minigpt.data.build import STATS_FILE, DatasetBuildError, build_dataset, split_examples
from minigpt.data.shards import open_shard
from minigpt.data.sources import MAX_DOCUMENT_CHARS, cut_long_text, parse_record, training_texts


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def stats_of(dataset):
    return json.loads((dataset / STATS_FILE).read_text())


def shard_bytes(dataset):
    return {p.relative_to(dataset).as_posix(): p.read_bytes() for p in sorted(dataset.rglob("*.bin"))}


def test_split_is_deterministic_and_by_document(tmp_path, data_tokenizer, demo_corpus):
    first = build_dataset([demo_corpus], tmp_path / "a", data_tokenizer, val_fraction=0.05, seed=7, progress=False)
    again = build_dataset([demo_corpus], tmp_path / "b", data_tokenizer, val_fraction=0.05, seed=7, progress=False)
    other = build_dataset([demo_corpus], tmp_path / "c", data_tokenizer, val_fraction=0.05, seed=8, progress=False)
    assert shard_bytes(first) == shard_bytes(again)
    assert shard_bytes(first)["val/tokens.bin"] != shard_bytes(other)["val/tokens.bin"]
    train, val = open_shard(first, "train"), open_shard(first, "val")
    totals = stats_of(first)["totals"]
    assert val.num_documents == round(0.05 * totals["documents_kept"])
    assert train.num_documents + val.num_documents == totals["documents_kept"]
    assert train.num_tokens + val.num_tokens == totals["tokens"]
    file_stats = stats_of(first)["files"][0]
    assert file_stats["val_documents"] == val.num_documents and file_stats["val_tokens"] == val.num_tokens
    assert file_stats["validation_share"] == pytest.approx(0.05, abs=0.001)


def test_split_keeps_one_example_on_each_side():
    assert split_examples(3, 0.01, 0).sum() == 1
    assert split_examples(2, 0.9, 0).sum() == 1
    assert split_examples(1, 0.5, 0).sum() == 0
    assert split_examples(10, 0.0, 0).sum() == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_examples(10, 1.0, 0)


def test_two_workers_write_the_same_shards_as_one(tmp_path, data_tokenizer, demo_corpus):
    one = build_dataset([demo_corpus], tmp_path / "one", data_tokenizer, workers=1, progress=False)
    two = build_dataset([demo_corpus], tmp_path / "two", data_tokenizer, workers=2, progress=False)
    assert shard_bytes(one) == shard_bytes(two)


def bad_inputs(tmp_path):
    good = {"text": "a good document"}
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        b'{"text": "unterminated',                      # line 2: malformed JSON
        json.dumps({"body": "no text field"}).encode(),  # line 3: missing field
        b'{"text": "caf\xe9"}',                          # line 4: not UTF-8
        json.dumps({"text": "   "}).encode(),            # line 5: empty document
        json.dumps({"text": 5}).encode(),                # line 6: not a string
        b"[1, 2]",                                       # line 7: not an object
        json.dumps(good).encode(),
    ]) + b"\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    return jsonl, empty


def test_bad_input_is_counted_per_file_with_line_numbers(tmp_path, data_tokenizer, capsys):
    jsonl, empty = bad_inputs(tmp_path)
    dataset = build_dataset([jsonl, empty], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False)
    mixed, blank = stats_of(dataset)["files"]
    assert mixed["documents_read"] == 8 and mixed["documents_kept"] == 2
    assert mixed["skipped"] == {"malformed_json": 1, "missing_field": 1, "not_utf8": 1, "empty_document": 1,
                                "field_not_string": 1, "not_an_object": 1}
    assert mixed["first_skipped_lines"] == {"malformed_json": [2], "missing_field": [3], "not_utf8": [4],
                                            "empty_document": [5], "field_not_string": [6], "not_an_object": [7]}
    assert blank["skipped"] == {"empty_file": 1} and blank["documents_kept"] == 0
    assert stats_of(dataset)["totals"]["documents_skipped"] == 6
    assert open_shard(dataset).num_documents == 2
    err = capsys.readouterr().err
    assert "mixed.jsonl: skipped 6 of 8" in err and "malformed_json: 1 (lines 2)" in err


@pytest.mark.parametrize("line, reason", [(2, "malformed_json"), (3, "missing_field"), (4, "not_utf8"),
                                          (5, "empty_document")])
def test_strict_mode_fails_on_the_first_bad_record_and_writes_nothing(tmp_path, data_tokenizer, line, reason):
    jsonl, _ = bad_inputs(tmp_path)
    lines = jsonl.read_bytes().split(b"\n")
    jsonl.write_bytes(b"\n".join([lines[0], lines[line - 1]]) + b"\n")
    with pytest.raises(DatasetBuildError, match=rf"mixed.jsonl:2: {reason}"):
        build_dataset([jsonl], tmp_path / "ds", data_tokenizer, strict=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "mixed.jsonl"]


def test_strict_mode_refuses_an_empty_file(tmp_path, data_tokenizer):
    _, empty = bad_inputs(tmp_path)
    with pytest.raises(DatasetBuildError, match="empty.txt: empty file"):
        build_dataset([empty], tmp_path / "ds", data_tokenizer, strict=True, progress=False)


def test_nothing_usable_is_an_error(tmp_path, data_tokenizer):
    _, empty = bad_inputs(tmp_path)
    with pytest.raises(DatasetBuildError, match="no usable pretrain examples in .*empty.txt"):
        build_dataset([empty], tmp_path / "ds", data_tokenizer, progress=False)
    assert not (tmp_path / "ds").exists()


def test_gzip_and_glob_inputs(tmp_path, data_tokenizer):
    for index in range(2):
        with gzip.open(tmp_path / f"part{index}.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"content": f"doc {index}.{n}"}) + "\n" for n in range(5)))
    dataset = build_dataset([str(tmp_path / "part*.jsonl.gz")], tmp_path / "ds", data_tokenizer,
                            text_field="content", val_fraction=0, progress=False)
    reader = open_shard(dataset)
    assert [data_tokenizer.decode(reader.document(i)[:-1]) for i in range(10)] == \
        [f"doc {i}.{n}" for i in range(2) for n in range(5)]


def test_truncated_gzip_keeps_what_was_read_and_reports_it(tmp_path, data_tokenizer):
    path = tmp_path / "cut.jsonl.gz"
    payload = gzip.compress("".join(json.dumps({"text": f"document number {n}"}) + "\n"
                                    for n in range(2000)).encode())
    path.write_bytes(payload[:len(payload) // 2])
    dataset = build_dataset([path], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False)
    stats = stats_of(dataset)["files"][0]
    assert stats["skipped"] == {"unreadable_file": 1} and 0 < stats["documents_kept"] < 2000
    assert stats["documents_read"] == stats["documents_kept"] + 1  # the record cut off by the truncation
    assert stats_of(dataset)["totals"]["documents_skipped"] == 1
    with pytest.raises(DatasetBuildError, match="cut.jsonl.gz: cannot be read to the end"):
        build_dataset([path], tmp_path / "strict", data_tokenizer, strict=True, progress=False)


LONE_SURROGATE_RECORDS = {  # line 2 of each file holds "\ud800", a lone surrogate (JSON allows the escape)
    "pretrain": ['{"text": "good one"}', '{"text": "x\\ud800y"}', '{"text": "good two"}'],
    "sft": ['{"instruction": "Hi", "output": "Hello"}', '{"instruction": "Hi", "output": "x\\ud800y"}',
            '{"instruction": "Yo", "output": "Hey"}'],
    "dpo": ['{"prompt": "1+1", "chosen": "2", "rejected": "3"}', '{"prompt": "1+1", "chosen": "\\ud800", '
            '"rejected": "3"}', '{"prompt": "2+2", "chosen": "4", "rejected": "5"}'],
    "rlhf": ['{"prompt": "1+1", "reference": "2"}', '{"prompt": "1+1", "task": "x\\udfffy"}',
             '{"prompt": "2+2", "reference": "4"}'],
}


@pytest.mark.parametrize("kind", sorted(LONE_SURROGATE_RECORDS))
def test_a_record_with_a_lone_surrogate_is_skipped_and_counted(tmp_path, data_tokenizer, kind):
    path = tmp_path / "surrogate.jsonl"
    path.write_text("\n".join(LONE_SURROGATE_RECORDS[kind]) + "\n")
    dataset = build_dataset([path], tmp_path / "ds", data_tokenizer, kind=kind, val_fraction=0, progress=False)
    stats = stats_of(dataset)["files"][0]
    assert stats["skipped"] == {"lone_surrogate": 1} and stats["first_skipped_lines"] == {"lone_surrogate": [2]}
    assert stats["documents_kept"] == 2 and open_shard(dataset).meta["num_examples"] == 2


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_strict_mode_names_file_line_and_field_of_a_lone_surrogate(tmp_path, data_tokenizer, kind, capsys):
    path = tmp_path / "surrogate.jsonl"
    path.write_text("\n".join(LONE_SURROGATE_RECORDS[kind]) + "\n")
    argv = ["--input", str(path), "--tokenizer", str(data_tokenizer.directory), "--out", str(tmp_path / "ds"),
            "--kind", kind, "--strict", "--quiet"]
    assert pretokenize.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "surrogate.jsonl:2: lone_surrogate" in err
    assert "field " in err and "strict mode" in err
    assert not (tmp_path / "ds").exists()


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path, data_tokenizer):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    stats = stats_of(build_dataset([jsonl], tmp_path / "j", data_tokenizer, val_fraction=0, progress=False))
    assert stats["totals"]["skipped"] == {} and stats["totals"]["documents_kept"] == 2
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\nSecond paragraph.\n")
    reader = open_shard(build_dataset([text], tmp_path / "t", data_tokenizer, val_fraction=0, progress=False))
    assert data_tokenizer.decode(reader.document(0)[:-1]) == "First paragraph."


def test_a_one_document_corpus_is_cut_into_pieces_so_validation_gets_a_share(tmp_path, data_tokenizer,
                                                                             demo_corpus):
    lines = [line for line in demo_corpus.read_text().splitlines() if line.strip()]
    document = "\n".join(lines)  # ~440 KB without a blank line: one .txt document
    assert len(document) > 4 * MAX_DOCUMENT_CHARS
    path = tmp_path / "book.txt"
    path.write_text(document + "\n")
    dataset = build_dataset([path], tmp_path / "ds", data_tokenizer, val_fraction=0.01, progress=False)
    stats = stats_of(dataset)["files"][0]
    assert stats["documents_read"] == stats["documents_kept"] == 1 and stats["documents_cut"] == 1
    assert stats["train_documents"] >= 3 and stats["val_documents"] >= 1
    assert 0 < stats["validation_share"] < 0.5
    pieces = []
    for split in ("train", "val"):
        reader = open_shard(dataset, split)
        for index in range(reader.num_documents):
            assert int(reader.document(index)[-1]) == data_tokenizer.eos_id
            pieces.append(data_tokenizer.decode(reader.document(index)[:-1]))
    assert all(len(piece) <= MAX_DOCUMENT_CHARS for piece in pieces)
    assert sum(not piece.endswith("\n") for piece in pieces) == 1  # cut after a newline, but the last piece
    assert Counter("".join(pieces)) == Counter(document)  # nothing lost, nothing added


def test_a_long_document_is_cut_at_line_ends_and_a_long_line_where_it_must():
    assert cut_long_text("abc\ndef\nghi", 8) == ["abc\ndef\n", "ghi"]
    assert cut_long_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert cut_long_text("ab\ncdefghij", 4) == ["ab\n", "cdef", "ghij"]
    assert cut_long_text("short", 8) == ["short"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)], ids=["umask022", "umask027"])
def test_dataset_directories_get_the_permissions_of_an_ordinary_mkdir(tmp_path, data_tokenizer, demo_corpus,
                                                                      umask, mode):
    old = os.umask(umask)
    try:
        dataset = build_dataset([demo_corpus], tmp_path / "ds", data_tokenizer, progress=False)
    finally:
        os.umask(old)
    for directory in (dataset, dataset / "train", dataset / "val"):
        assert stat.S_IMODE(directory.stat().st_mode) == mode, directory


def test_post_training_records_are_validated(tmp_path, data_tokenizer):
    user = {"role": "user", "content": "hi"}
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [user, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Greet", "input": "Ann", "output": "Hi Ann"},
        {"conversations": [user]},                                           # line 3: no assistant turn
        {"conversations": [user, {"role": "assistant", "content": " "}]},    # line 4: empty response
        {"conversations": [{"role": "robot", "content": "x"}]},              # line 5: bad role
        {"question": "?"},                                                   # line 6: missing fields
    ])
    stats = stats_of(build_dataset([sft], tmp_path / "sft", data_tokenizer, kind="sft", progress=False))["files"][0]
    assert stats["documents_kept"] == 2
    assert stats["first_skipped_lines"] == {"no_assistant_turn": [3], "empty_response": [4],
                                            "malformed_conversation": [5], "missing_field": [6]}
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "Add 1+1", "chosen": "2", "rejected": "3"},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"},
        {"prompt": "Add 1+1", "chosen": "2", "rejected": "2"},               # line 3: identical
        {"prompt": "Add 1+1", "chosen": "2"},                                # line 4: missing rejected
        {"prompt": "word " * 100, "chosen": "a", "rejected": "b"},           # line 5: prompt too long
    ])
    dataset = build_dataset([dpo], tmp_path / "dpo", data_tokenizer, kind="dpo", max_prompt_tokens=64,
                            val_fraction=0, progress=False)
    stats = stats_of(dataset)["files"][0]
    assert stats["first_skipped_lines"] == {"chosen_equals_rejected": [3], "missing_field": [4],
                                            "prompt_too_long": [5]}
    assert open_shard(dataset).num_documents == 4 and open_shard(dataset).meta["num_examples"] == 2
    rlhf = write_jsonl(tmp_path / "rlhf.jsonl", [{"prompt": "Add 1+1", "reference": "2"}, {"prompt": ""},
                                                 {"prompt": "x", "reference": 2}])
    stats = stats_of(build_dataset([rlhf], tmp_path / "rlhf", data_tokenizer, kind="rlhf",
                                   progress=False))["files"][0]
    assert stats["first_skipped_lines"] == {"empty_prompt": [2], "field_not_string": [3]}


def test_existing_output_is_kept_unless_overwrite(tmp_path, data_tokenizer, demo_corpus):
    out = tmp_path / "ds"
    build_dataset([demo_corpus], out, data_tokenizer, progress=False)
    with pytest.raises(DatasetBuildError, match="already exists"):
        build_dataset([demo_corpus], out, data_tokenizer, progress=False)
    build_dataset([demo_corpus], out, data_tokenizer, kind="pretrain", val_fraction=0.5, overwrite=True,
                  progress=False)
    assert stats_of(out)["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_pretokenize_cli(tmp_path, data_tokenizer, capsys):
    jsonl, _ = bad_inputs(tmp_path)
    base = ["--input", str(jsonl), "--tokenizer", str(data_tokenizer.directory), "--quiet"]
    assert pretokenize.main(base + ["--out", str(tmp_path / "ok"), "--val-fraction", "0"]) == 0
    assert open_shard(tmp_path / "ok").num_documents == 2
    assert pretokenize.main(base + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "mixed.jsonl:2: malformed_json" in capsys.readouterr().err
    assert pretokenize.main(["--input", str(tmp_path / "nope.jsonl"), "--tokenizer", str(data_tokenizer.directory),
                             "--out", str(tmp_path / "x")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_shared_chinese_corpus_builds(tmp_path, data_tokenizer):
    corpus = shared_file("zh_classics.jsonl")
    sample = tmp_path / "zh.jsonl"
    with open(corpus, encoding="utf-8") as handle:
        sample.write_text("".join(next(handle) for _ in range(500)), encoding="utf-8")
    dataset = build_dataset([sample], tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False)
    reader = open_shard(dataset, "train")
    texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()]
    decoded = {data_tokenizer.decode(reader.document(i)[:-1]) for i in range(reader.num_documents)}
    assert decoded <= set(texts) and len(decoded) == reader.num_documents == 450


def test_a_deeply_nested_record_is_skipped_as_malformed_not_a_crash():
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    skip = parse_record("pretrain", "jsonl", 7, deep)
    assert (skip.line, skip.reason) == (7, "malformed_json")
    assert training_texts("jsonl", deep) == []
