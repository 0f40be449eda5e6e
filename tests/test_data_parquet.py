"""Parquet inputs: rows read as JSONL records are (same shards, same skips), streamed, and bad files named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_data_build import shard_bytes, stats_of, write_jsonl

from minigpt.cli import pretokenize
from minigpt.data.build import DatasetBuildError, build_dataset
from minigpt.data.shards import open_shard
from minigpt.data.sources import InputError, expand_inputs
from minigpt.tokenizer_training import train_tokenizer

pa = pytest.importorskip("pyarrow", reason="Parquet inputs need the optional pyarrow (pip install -e \".[parquet]\")")
pq = pytest.importorskip("pyarrow.parquet", reason="Parquet inputs need the optional pyarrow")


def write_parquet(path, records, row_group_size=7):
    """`records` as a Parquet table (keys missing from a record become null cells), in small row groups."""
    columns = dict.fromkeys(key for record in records for key in record)
    table = pa.Table.from_pylist([{key: record.get(key) for key in columns} for record in records])
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def pretrain_records(count=60):
    return [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog.\n学而时习之 {i}", "id": i}
            for i in range(count)]


CHATS = [
    {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}?"},
                       {"role": "assistant", "content": f"Hello {i}."}]} if i % 3 else
    {"instruction": f"Add {i} and 2.", "input": "", "output": str(i + 2)}
    for i in range(30)
]
PREFERENCES = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(30)]
PROMPTS = [{"prompt": f"What is {i} + 1?", "reference": str(i + 1), "level": i % 3} for i in range(30)]


@pytest.mark.parametrize("kind, records", [("pretrain", pretrain_records()), ("sft", CHATS), ("dpo", PREFERENCES),
                                           ("rlhf", PROMPTS)])
def test_parquet_builds_the_same_shards_as_the_equivalent_jsonl(tmp_path, data_tokenizer, kind, records):
    jsonl = write_jsonl(tmp_path / "data.jsonl", records)
    parquet = write_parquet(tmp_path / "data.parquet", records)
    from_jsonl = build_dataset([jsonl], tmp_path / "j", data_tokenizer, kind=kind, val_fraction=0.1, progress=False)
    from_parquet = build_dataset([parquet], tmp_path / "p", data_tokenizer, kind=kind, val_fraction=0.1,
                                 progress=False)
    assert shard_bytes(from_parquet) == shard_bytes(from_jsonl)
    assert open_shard(from_parquet).num_documents > 0
    if kind == "rlhf":
        for split in ("train", "val"):
            assert (from_parquet / split / "records.jsonl").read_text() == (from_jsonl / split / "records.jsonl").read_text()
    parquet_file, jsonl_file = stats_of(from_parquet)["files"][0], stats_of(from_jsonl)["files"][0]
    assert parquet_file["format"] == "parquet"
    for key in ("documents_read", "documents_kept", "tokens", "skipped"):
        assert parquet_file[key] == jsonl_file[key]


def test_bad_rows_are_counted_by_row_number_and_strict_mode_names_the_row(tmp_path, data_tokenizer, capsys):
    records = [{"text": "a good document"}, {"text": None}, {"text": "   "}, {"text": "another good one"}]
    parquet = write_parquet(tmp_path / "rows.parquet", records, row_group_size=2)
    dataset = build_dataset([parquet], tmp_path / "ds", data_tokenizer, val_fraction=0, progress=False)
    file_stats = stats_of(dataset)["files"][0]
    assert file_stats["skipped"] == {"missing_field": 1, "empty_document": 1}  # a null cell is a missing field
    assert file_stats["first_skipped_lines"] == {"missing_field": [2], "empty_document": [3]}
    assert "missing_field: 1 (rows 2)" in capsys.readouterr().err
    with pytest.raises(DatasetBuildError, match=r"rows.parquet: row 2: missing_field \(text\)"):
        build_dataset([parquet], tmp_path / "strict", data_tokenizer, strict=True, progress=False)


def test_the_text_field_chooses_the_column_and_a_table_without_it_has_nothing_usable(tmp_path, data_tokenizer):
    records = [{"body": f"text number {i}", "meta": {"url": f"https://example.org/{i}"}} for i in range(10)]
    parquet = write_parquet(tmp_path / "body.parquet", records)
    dataset = build_dataset([parquet], tmp_path / "ds", data_tokenizer, text_field="body", val_fraction=0,
                            progress=False)
    assert data_tokenizer.decode(list(open_shard(dataset).document(0))).startswith("text number 0")
    assert stats_of(dataset)["files"][0]["documents_kept"] == 10
    with pytest.raises(DatasetBuildError, match="no usable pretrain examples"):
        build_dataset([parquet], tmp_path / "none", data_tokenizer, val_fraction=0, progress=False)


def test_train_tokenizer_learns_the_same_vocabulary_from_parquet_as_from_jsonl(tmp_path):
    records = pretrain_records(200) + [{"conversations": [{"role": "user", "content": "床前明月光"},
                                                          {"role": "assistant", "content": "疑是地上霜"}]}]
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", records)
    parquet = write_parquet(tmp_path / "corpus.parquet", records, row_group_size=50)
    from_jsonl = train_tokenizer([jsonl], tmp_path / "tok_j", vocab_size=400)
    from_parquet = train_tokenizer([parquet], tmp_path / "tok_p", vocab_size=400)
    assert from_parquet.checksum == from_jsonl.checksum
    assert from_parquet.decode(from_parquet.encode("疑是地上霜")) == "疑是地上霜"


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_or_foreign_parquet_file_is_an_error_naming_it(tmp_path, data_tokenizer):
    cut = truncated(write_parquet(tmp_path / "cut.parquet", pretrain_records()))
    foreign = write_jsonl(tmp_path / "foreign.parquet", pretrain_records(3))
    for bad in (cut, foreign):
        with pytest.raises(DatasetBuildError, match=rf"{bad.name}: not a readable Parquet file"):
            build_dataset([bad], tmp_path / "ds", data_tokenizer, strict=True, progress=False)
        with pytest.raises(InputError, match=rf"{bad.name}: not a readable Parquet file"):
            train_tokenizer([bad], tmp_path / "tok", vocab_size=400)
    good = write_parquet(tmp_path / "good.parquet", pretrain_records(10))
    dataset = build_dataset([good, cut], tmp_path / "lenient", data_tokenizer, val_fraction=0, progress=False)
    assert stats_of(dataset)["files"][1]["skipped"] == {"unreadable_file": 1}
    assert stats_of(dataset)["totals"]["documents_kept"] == 10
    assert not (tmp_path / "ds").exists()


def test_a_corrupt_row_group_is_an_error_naming_the_file_and_row(tmp_path, data_tokenizer):
    path = write_parquet(tmp_path / "corrupt.parquet", pretrain_records(40), row_group_size=20)
    metadata = pq.ParquetFile(path).metadata
    second = metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = second.dictionary_page_offset if second.has_dictionary_page else second.data_page_offset
    data[start:start + second.total_compressed_size] = b"\xff" * second.total_compressed_size
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetBuildError, match=r"corrupt.parquet: row 21 and after cannot be read"):
        build_dataset([path], tmp_path / "ds", data_tokenizer, strict=True, progress=False)


def test_reading_from_a_row_on_gives_those_rows_and_never_decodes_the_row_groups_before(tmp_path, monkeypatch):
    import minigpt.data.parquet as parquet
    from minigpt.data.sources import iter_raw_records

    monkeypatch.setattr(parquet, "BATCH_ROWS", 8)  # first rows inside a batch, at its edges, at a group's
    path = write_parquet(tmp_path / "rows.parquet", pretrain_records(60), row_group_size=20)
    every = list(iter_raw_records(path, ["text"]))
    assert [row for row, _record in every] == list(range(1, 61))
    for first in (1, 2, 8, 9, 20, 21, 22, 37, 41, 60, 61, 100):
        assert list(iter_raw_records(path, ["text"], first_row=first)) == every[first - 1:]
    # a resumed build starts past a damaged second row group without reading it
    metadata = pq.ParquetFile(path).metadata
    second = metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = second.dictionary_page_offset if second.has_dictionary_page else second.data_page_offset
    data[start:start + second.total_compressed_size] = b"\xff" * second.total_compressed_size
    path.write_bytes(bytes(data))
    assert list(iter_raw_records(path, ["text"], first_row=41)) == every[40:]
    with pytest.raises(InputError, match="row 21 and after cannot be read"):
        list(iter_raw_records(path, ["text"], first_row=30))


def test_without_pyarrow_a_parquet_input_names_the_file_and_the_install_command(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "data.parquet", pretrain_records(3))
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if pyarrow were not installed
    with pytest.raises(InputError, match=r'data.parquet: reading Parquet needs pyarrow.*pip install -e "\.\[parquet\]"'):
        expand_inputs([path])


def test_the_data_modules_do_not_import_pyarrow():
    code = ("import sys, minigpt.data.build, minigpt.tokenizer_training, minigpt.cli.pretokenize, "
            "minigpt.train.run_data; print('pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_pretokenize_cli_reads_parquet_globs(tmp_path, data_tokenizer):
    for part in range(2):
        write_parquet(tmp_path / f"part-{part}.parquet", pretrain_records(20))
    out = tmp_path / "ds"
    assert pretokenize.main(["--input", str(tmp_path / "part-*.parquet"), "--tokenizer", str(data_tokenizer.directory),
                             "--out", str(out), "--quiet"]) == 0
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert [f["documents_kept"] for f in stats["files"]] == [20, 20]


def test_a_messages_column_is_a_conversation_in_parquet_and_jsonl_alike(tmp_path, data_tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}?"}, {"role": "assistant", "content": f"Hello {i}."}]}
             for i in range(10)]
    renamed = [{"conversations": chat["messages"]} for chat in chats]
    built = [build_dataset([write(tmp_path / name, records)], tmp_path / name.replace(".", "-"), data_tokenizer,
                           kind="sft", val_fraction=0, progress=False)
             for write, name, records in ((write_parquet, "m.parquet", chats), (write_jsonl, "m.jsonl", chats),
                                          (write_jsonl, "c.jsonl", renamed))]
    assert shard_bytes(built[0]) == shard_bytes(built[1]) == shard_bytes(built[2])
    assert stats_of(built[0])["totals"]["documents_kept"] == 10


@pytest.mark.integration
def test_reading_parquet_streams_row_groups_so_memory_does_not_grow_with_the_file(tmp_path):
    """Peak RSS of reading every row of a file 10x larger stays within a few MiB of the smaller one's."""
    text = "床前明月光，疑是地上霜。" * 40 + "The quick brown fox. " * 20
    peaks = {}
    for row_groups in (4, 40):
        path = tmp_path / f"g{row_groups}.parquet"
        with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("id", pa.int64())])) as writer:
            for group in range(row_groups):
                writer.write_table(pa.table({"text": [f"{group} {i} {text}" for i in range(4096)],
                                             "id": list(range(4096))}))
        code = ("import resource; from pathlib import Path; from minigpt.data.sources import iter_raw_records; "
                f"rows = sum(1 for _ in iter_raw_records(Path({str(path)!r}), ['text'])); "
                "print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        rows, peak_kib = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.split()
        assert int(rows) == row_groups * 4096
        peaks[row_groups] = int(peak_kib) / 1024
    metadata = pq.ParquetFile(path).metadata
    decoded = sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
    assert decoded > 200 * 2**20  # the larger file's text is far more than the bound below
    assert peaks[40] < peaks[4] + 16, peaks


def test_training_takes_a_raw_parquet_file_as_data(tmp_path, data_tokenizer):
    from minigpt.config import TrainConfig, data_name
    from minigpt.runtime import Runtime
    from minigpt.train.run_data import resolve_run_data

    parquet = write_parquet(tmp_path / "web.parquet", pretrain_records(40))
    cfg = TrainConfig.of(data=[str(parquet)], data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                      tokenizer=str(data_tokenizer.directory))
    dataset = resolve_run_data(cfg, Runtime(), None, "pretrain").dataset_dirs[-1]
    assert stats_of(dataset)["files"][0]["format"] == "parquet"
    assert stats_of(dataset)["totals"]["documents_kept"] == 40
    assert data_name([str(parquet)]) == "web"
