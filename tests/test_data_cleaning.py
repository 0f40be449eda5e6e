"""Cleaning at the door: exact de-duplication and document filters, counted in dataset_stats.json."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_build import shard_bytes, stats_of, write_jsonl

from minigpt.cli import pretokenize
from minigpt.data.build import CHUNK_RECORDS, DatasetBuildError, build_dataset
from minigpt.data.cleaning import Cleaning, DuplicateFilter, normalise, repeated_line_share
from minigpt.data.shards import open_shard


def documents(dataset, tokenizer, split="train"):
    shard = open_shard(dataset, split)
    return [tokenizer.decode(list(shard.document(i))[:-1]) for i in range(shard.num_documents)]


def test_cleaning_is_off_by_default_and_keeps_every_document(tmp_path, data_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "same"}, {"text": "same"}, {"text": "x"}])
    dataset = build_dataset([corpus], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False)
    stats = stats_of(dataset)
    assert stats["cleaning"] == {"dedup": False, "min_chars": 0, "max_repeated_lines": 1.0}
    assert stats["totals"]["documents_kept"] == 3 and stats["totals"]["documents_dropped"] == 0


def test_dedup_keeps_the_first_copy_across_files_and_counts_the_others_where_they_are(tmp_path, data_tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello   World"}, {"text": "unique one"},
                                               {"text": "hello world"}])  # line 3: the same once normalised
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "HELLO\tWORLD\n"}, {"text": "unique two"},
                                                {"text": "Unique\u0301 one"}, {"text": "Uniqué one"}])
    dataset = build_dataset([first, second], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False,
                            cleaning=Cleaning(dedup=True))
    assert documents(dataset, data_tokenizer) == ["Hello   World", "unique one", "unique two", "Unique\u0301 one"]
    a, b = stats_of(dataset)["files"]
    assert a["dropped"] == {"duplicate": 1} and a["first_dropped_lines"] == {"duplicate": [3]}
    assert b["dropped"] == {"duplicate": 2} and b["first_dropped_lines"] == {"duplicate": [1, 4]}  # NFC: é
    assert (a["documents_read"], a["documents_kept"], b["documents_kept"]) == (3, 2, 2)
    totals = stats_of(dataset)["totals"]
    assert totals["dropped"] == {"duplicate": 3, "too_short": 0, "repetitive": 0}
    assert totals["documents_dropped"] == 3 and totals["documents_skipped"] == 0


def duplicated_corpus(tmp_path, count=3 * CHUNK_RECORDS):
    """Documents spread over several chunks, every third one a copy of an earlier one (some far back)."""
    rng = np.random.default_rng(0)
    texts = []
    for i in range(count):
        texts.append(texts[int(rng.integers(len(texts)))] if i % 3 == 2 else f"document {i} " + "word " * (i % 7))
    return write_jsonl(tmp_path / "dup.jsonl", [{"text": t} for t in texts]), texts


def test_dedup_gives_the_same_shards_for_any_number_of_workers_and_equals_a_deduplicated_input(tmp_path,
                                                                                             data_tokenizer):
    corpus, texts = duplicated_corpus(tmp_path)
    unique = write_jsonl(tmp_path / "unique.jsonl", [{"text": t} for t in dict.fromkeys(texts)])
    cleaning = Cleaning(dedup=True)
    one = build_dataset([corpus], tmp_path / "one", data_tokenizer, workers=1, progress=False, cleaning=cleaning)
    two = build_dataset([corpus], tmp_path / "two", data_tokenizer, workers=2, progress=False, cleaning=cleaning)
    reference = build_dataset([unique], tmp_path / "ref", data_tokenizer, progress=False)
    assert shard_bytes(one) == shard_bytes(two) == shard_bytes(reference)
    assert stats_of(one)["totals"]["dropped"]["duplicate"] == len(texts) - len(set(texts))


def test_dedup_of_conversations_compares_every_turn(tmp_path, data_tokenizer):
    def chat(question, answer):
        return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    corpus = write_jsonl(tmp_path / "chat.jsonl", [chat("Hi?", "Hello."), chat("hi?", "hello."), chat("Hi?", "Bye."),
                                                    {"instruction": "Hi?", "output": "Hello."}])
    dataset = build_dataset([corpus], tmp_path / "ds", data_tokenizer, kind="sft", val_fraction=0, progress=False,
                            cleaning=Cleaning(dedup=True))
    assert stats_of(dataset)["files"][0]["first_dropped_lines"] == {"duplicate": [2, 4]}
    assert open_shard(dataset).num_documents == 2


def test_dedup_of_preference_pairs_drops_both_documents_of_a_pair(tmp_path, data_tokenizer):
    pair = {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"}
    corpus = write_jsonl(tmp_path / "dpo.jsonl", [pair, {**pair, "rejected": "maybe"}, pair])
    dataset = build_dataset([corpus], tmp_path / "ds", data_tokenizer, kind="dpo", val_fraction=0, progress=False,
                            cleaning=Cleaning(dedup=True))
    assert stats_of(dataset)["files"][0]["dropped"] == {"duplicate": 1}
    assert open_shard(dataset).num_documents == 4


def test_length_and_repetition_filters_drop_and_count_documents(tmp_path, data_tokenizer, capsys):
    menu = "Home\nAbout\nHome\nAbout\nHome\nContact"  # 3 of 6 lines repeat an earlier one
    corpus = write_jsonl(tmp_path / "web.jsonl", [{"text": "a long enough document of prose"}, {"text": "  short  "},
                                                  {"text": menu}, {"text": "another long enough document"}])
    dataset = build_dataset([corpus], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False,
                            cleaning=Cleaning(min_chars=10, max_repeated_lines=0.3))
    file_stats = stats_of(dataset)["files"][0]
    assert file_stats["dropped"] == {"too_short": 1, "repetitive": 1}
    assert file_stats["first_dropped_lines"] == {"too_short": [2], "repetitive": [3]}
    assert file_stats["skipped"] == {} and file_stats["documents_kept"] == 2
    assert "cleaning dropped 2 of 4 documents: too_short 1, repetitive 1" in capsys.readouterr().err
    lenient = build_dataset([corpus], tmp_path / "lenient", data_tokenizer, val_fraction=0, progress=False,
                            cleaning=Cleaning(max_repeated_lines=0.5))
    assert stats_of(lenient)["files"][0]["dropped"] == {}


def test_cleaning_drops_are_not_bad_input_under_strict_mode(tmp_path, data_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "kept document"}, {"text": "kept document"}])
    dataset = build_dataset([corpus], tmp_path / "ds", data_tokenizer, val_fraction=0, strict=True, progress=False,
                            cleaning=Cleaning(dedup=True))
    assert stats_of(dataset)["totals"]["documents_dropped"] == 1


def test_document_filters_are_refused_for_chat_data_and_out_of_range_values(tmp_path, data_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DatasetBuildError, match="dpo data takes --dedup only"):
        build_dataset([corpus], tmp_path / "ds", data_tokenizer, kind="dpo", progress=False,
                      cleaning=Cleaning(min_chars=5))
    with pytest.raises(ValueError, match=r"max_repeated_lines must be in \[0, 1\]"):
        Cleaning(max_repeated_lines=1.5)
    with pytest.raises(ValueError, match="min_chars must be 0 or more"):
        Cleaning(min_chars=-1)


def test_normalisation_and_repeated_line_share():
    assert normalise(" Cafe\u0301\u3000Width\n\tTEXT ") == "café width text"
    assert normalise("Ｆｕｌｌ") == "ｆｕｌｌ"  # NFC keeps full-width letters (NFKC would cost as much as tokenizing)
    assert repeated_line_share("a\nb\n\na\n a \nc") == pytest.approx(2 / 5)
    assert repeated_line_share("") == 0.0


def test_duplicate_filter_agrees_with_a_set_across_batches_and_growth():
    rng = np.random.default_rng(1)
    seen_filter, seen = DuplicateFilter(capacity=8), set()
    for _ in range(100):
        hashes = rng.integers(0, 3000, size=int(rng.integers(0, 200)), dtype=np.uint64)
        expected = []
        for value in hashes.tolist():
            value = value or 1  # 0 marks an empty slot: the filter counts it as 1
            expected.append(value not in seen)
            seen.add(value)
        assert seen_filter.first_seen(hashes).tolist() == expected
    assert seen_filter.count == len(seen)
    assert seen_filter.nbytes <= 8 * len(seen) / (DuplicateFilter.MAX_LOAD / 2)


def test_pretokenize_cli_cleaning_flags(tmp_path, data_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "one document here"}, {"text": "one document here"},
                                                {"text": "tiny"}])
    out = tmp_path / "ds"
    assert pretokenize.main(["--input", str(corpus), "--tokenizer", str(data_tokenizer.directory), "--out", str(out),
                             "--dedup", "--min-chars", "5", "--max-repeated-lines", "0.5", "--quiet",
                             "--val-fraction", "0"]) == 0
    stats = stats_of(out)
    assert stats["cleaning"] == {"dedup": True, "min_chars": 5, "max_repeated_lines": 0.5}
    assert stats["totals"]["dropped"] == {"duplicate": 1, "too_short": 1, "repetitive": 0}
    assert pretokenize.main(["--input", str(corpus), "--tokenizer", str(data_tokenizer.directory), "--out",
                             str(tmp_path / "bad"), "--max-repeated-lines", "2"]) == 2


def test_training_on_raw_files_cleans_them_as_the_config_asks_into_a_cache_of_its_own(tmp_path, data_tokenizer):
    from minigpt.config import ConfigError, TrainConfig
    from minigpt.runtime import Runtime
    from minigpt.train.run_data import resolve_run_data

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"document {i}"} for i in range(20)] * 2)
    built = {}
    for dedup in (False, True):
        cfg = TrainConfig.of(data=[str(corpus)], data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                          tokenizer=str(data_tokenizer.directory), dedup=dedup)
        built[dedup] = resolve_run_data(cfg, Runtime(), None, "pretrain").dataset_dirs[-1]
    assert built[False] != built[True]
    assert stats_of(built[False])["totals"]["documents_kept"] == 40
    assert stats_of(built[True])["totals"]["dropped"]["duplicate"] == 20
    with pytest.raises(ConfigError, match="sft data takes --dedup only"):
        TrainConfig.of(mode="sft", min_chars=10).validate()
    with pytest.raises(ConfigError, match=r"--max-repeated-lines must be in \[0, 1\]"):
        TrainConfig.of(max_repeated_lines=2.0).validate()
