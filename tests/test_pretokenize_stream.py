"""Streaming pre-tokenization: blocks of whole records, worker processes, resuming an interrupted build,
memory that does not grow with the input."""

from __future__ import annotations

import copy
import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from minigpt.data import build
from minigpt.data.build import PROGRESS_FILE, STATS_FILE, build_dataset
from minigpt.data.shards import ShardReader, ShardWriter
from minigpt.data.sources import block_records, iter_blocks, iter_raw_records, parse_record, pretrain_texts

ROOT = Path(__file__).resolve().parents[1]

TRICKY = {  # (suffix, bytes): byte order mark, CRLF, whitespace-only lines, no newline at the end
    "bom.txt": b"\xef\xbb\xbfFirst para\r\nstill first\r\n \t\r\n\n\nSecond\n\x0c\nThird, no newline",
    "blank.txt": b"\n\n  \nOnly one\n\n",
    "lines.jsonl": b'\xef\xbb\xbf{"text": "a"}\r\n\n  \n{"text": "b"}\n{"text": "c"}',
    "lines.jsonl.gz": gzip.compress(b'{"text": "x"}\n' * 50 + b'{"text": "last"}\n'),
}


def shard_bytes(dataset: Path) -> dict[str, bytes]:
    return {p.relative_to(dataset).as_posix(): p.read_bytes() for p in sorted(dataset.rglob("*"))
            if p.is_file() and p.name != STATS_FILE}


def stats_without_time(dataset: Path) -> dict:
    stats = json.loads((dataset / STATS_FILE).read_text())
    del stats["build_seconds"]
    return stats


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("size", [1, 20, 1 << 20])
def test_blocks_hold_the_records_iter_raw_records_reads_and_resume_at_any_block_end(tmp_path, name, size):
    path = tmp_path / name
    path.write_bytes(TRICKY[name])
    fmt = "txt" if name.endswith(".txt") else "jsonl"
    blocks = list(iter_blocks(path, size=size))
    records = [record for block in blocks for record in block_records(fmt, block)]
    expected = [(line, raw if fmt == "txt" else raw.rstrip(b"\n")) for line, raw in iter_raw_records(path)]
    assert records == expected
    for index, block in enumerate(blocks):  # a resumed read gives the records after the block
        rest = [r for b in iter_blocks(path, block.end, block.end_line, size) for r in block_records(fmt, b)]
        assert rest == [r for b in blocks[index + 1:] for r in block_records(fmt, b)]


def test_fast_pretrain_parsing_gives_what_parse_record_gives():
    records = [b'{"text": "plain"}', b'{"text": "emoji \\ud83d\\ude00"}', b'{"text": "x\\ud800y"}',
               b'{"text": "ok", "other": "\\udfff"}', b'{"text": "a", "n": NaN}', b'{"text": "b", "n": 1' + b"0" * 30 + b"}",
               b'{"text": 5}', b'{"body": "x"}', b'[1]', b'{"text": "   "}', b"", b"   ", b'{"text": "caf\xe9"}',
               b'{"text": "dup", "text": "last wins"}', b'{"text": "unterminated', b'{"text": "tab\\tnewline\\n"}']
    numbered = list(enumerate(records, start=1))
    lines, texts, skips = pretrain_texts("jsonl", numbered)
    expected = [parse_record("pretrain", "jsonl", line, raw) for line, raw in numbered]
    assert [(s.line, s.reason, s.detail) for s in skips] == \
        [(e.line, e.reason, e.detail) for e in expected if not hasattr(e, "text")]
    assert list(zip(lines, texts, strict=True)) == [(e.line, e.text) for e in expected if hasattr(e, "text")]


def test_encode_documents_is_encode_with_eos_of_each_text(data_tokenizer):
    texts = ["Hello world.", "学而时习之", "a typed \u2581 piece", "tabs\tand\nnewlines", "😀 emoji", " "]
    tokens, lengths = data_tokenizer.encode_documents(texts)
    expected = [data_tokenizer.encode(text, eos=True) for text in texts]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == [i for ids in expected for i in ids]
    tokens, lengths = data_tokenizer.encode_documents(texts[:2] + texts[3:], num_threads=2)
    assert tokens.tolist() == [i for text in texts[:2] + texts[3:] for i in data_tokenizer.encode(text, eos=True)]
    assert data_tokenizer.encode_documents([])[0].size == 0


def test_encode_documents_gives_the_same_arrays_with_and_without_sentencepieces_buffer_batch(data_tokenizer):
    texts = ["Hello world.", "学而时习之", "tabs\tand\nnewlines", "😀 emoji", " ", "x" * 5000]
    assert data_tokenizer._buffer_batch  # this sentencepiece passes the probe: the fast path is tested
    fast = data_tokenizer.encode_documents(texts, num_threads=2)
    slow_tokenizer = copy.copy(data_tokenizer)
    slow_tokenizer._buffer_batch = False
    slow = slow_tokenizer.encode_documents(texts, num_threads=2)
    for got, expected in zip(fast, slow, strict=True):
        assert got.dtype == expected.dtype and got.tolist() == expected.tolist()
    fast[0][0] = 0  # an array the caller may change, as before
    assert fast[1].tolist() == [len(data_tokenizer.encode(text, eos=True)) for text in texts]
    unpickled = pickle.loads(pickle.dumps(data_tokenizer))  # a tokenizer still travels to other processes
    assert unpickled._buffer_batch and unpickled.encode_documents(texts)[0].tolist() == slow[0].tolist()


def test_a_shard_writer_resumes_from_a_synced_position(tmp_path):
    common = {"vocab_size": 100, "kind": "sft", "tokenizer_checksum": "abc"}
    writer = ShardWriter(tmp_path / "a", **common)
    writer.add([1, 2, 3], [0, 1, 1])
    position = writer.sync()
    writer.add([4, 5], [1, 1])  # written after the position: cut off on resume
    writer.abandon()
    resumed = ShardWriter(tmp_path / "a", **common, resume=position)
    resumed.add([6], [1])
    resumed.close()
    reader = ShardReader(tmp_path / "a")
    assert [reader.document(i).tolist() for i in range(reader.num_documents)] == [[1, 2, 3], [6]]
    assert reader.loss_mask.tolist() == [0, 1, 1, 1]


def corpus_files(tmp_path: Path, demo_corpus: Path) -> list[Path]:
    """A .txt, a .jsonl with bad records and a .jsonl.gz: several files and chunks of every kind."""
    paragraphs = [p for p in demo_corpus.read_text().split("\n\n") if p.strip()][:400]
    jsonl = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": p}) for p in paragraphs[:200]]
    lines[5], lines[77] = '{"text": 3}', '{"text": "unterminated'
    jsonl.write_text("\n".join(lines) + "\n")
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(paragraphs[200:]) + "\n")
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps({"text": p[::-1]}) + "\n" for p in paragraphs).encode()))
    return [text, jsonl, packed]


def test_worker_processes_write_what_the_main_process_writes(tmp_path, data_tokenizer, demo_corpus, monkeypatch):
    files = corpus_files(tmp_path, demo_corpus)
    monkeypatch.setattr(build, "CHUNK_BYTES", 8192)
    children = {}

    def count_children(label):
        return lambda _progress: children.setdefault(label, set()).update(
            p.pid for p in psutil.Process().children(recursive=True))

    here = build_dataset(files, tmp_path / "here", data_tokenizer, workers=2, val_fraction=0.1, progress=False,
                         checkpoint_seconds=0, on_checkpoint=count_children("here"))
    assert children["here"] == set()  # a small input is encoded in-process, whatever --workers says
    monkeypatch.setattr(build, "IN_PROCESS_BYTES", 0)
    pool = build_dataset(files, tmp_path / "pool", data_tokenizer, workers=2, val_fraction=0.1, progress=False,
                         checkpoint_seconds=0, on_checkpoint=count_children("pool"))
    assert len(children["pool"]) >= 2
    assert shard_bytes(here) == shard_bytes(pool)
    assert stats_without_time(here) == stats_without_time(pool)
    assert stats_without_time(here)["totals"]["skipped"] == {"field_not_string": 1, "malformed_json": 1}


def interrupted_after(count: int):
    calls = []

    def on_checkpoint(_progress):
        calls.append(1)
        if len(calls) == count:
            raise KeyboardInterrupt

    return on_checkpoint


def test_an_interrupted_build_continues_where_it_stopped(tmp_path, data_tokenizer, demo_corpus, monkeypatch,
                                                         capsys):
    files = corpus_files(tmp_path, demo_corpus)
    monkeypatch.setattr(build, "CHUNK_BYTES", 8192)
    whole = build_dataset(files, tmp_path / "whole", data_tokenizer, val_fraction=0.1, progress=False)
    out, stopped_in = tmp_path / "ds", []
    for stop in (3, 12):  # inside the first file, then inside a later one (the second run resumes)
        with pytest.raises(KeyboardInterrupt):
            build_dataset(files, out, data_tokenizer, val_fraction=0.1, progress=False, checkpoint_seconds=0,
                          on_checkpoint=interrupted_after(stop))
        assert not out.exists()
        progress = json.loads((tmp_path / ".ds.partial" / PROGRESS_FILE).read_text())
        assert progress["shard"]["documents"] > 0 and not progress["done"]
        stopped_in.append(progress["position"]["file"])
    assert stopped_in[0] == 0 and stopped_in[1] >= 1
    capsys.readouterr()
    resumed_at = []
    build_dataset(files, out, data_tokenizer, val_fraction=0.1, progress=False, checkpoint_seconds=0,
                  on_checkpoint=lambda p: resumed_at.append(p.position.file))
    assert "resuming the interrupted build" in capsys.readouterr().err
    assert resumed_at[0] >= 1  # it did not start over at the first file
    assert shard_bytes(out) == shard_bytes(whole)
    assert stats_without_time(out) == stats_without_time(whole)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_changed_input_starts_over(tmp_path, data_tokenizer, demo_corpus, monkeypatch, capsys):
    files = corpus_files(tmp_path, demo_corpus)
    monkeypatch.setattr(build, "CHUNK_BYTES", 8192)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(files, out, data_tokenizer, progress=False, checkpoint_seconds=0,
                      on_checkpoint=interrupted_after(3))
    with open(files[0], "a") as handle:
        handle.write("\nA new last paragraph.\n")
    capsys.readouterr()
    build_dataset(files, out, data_tokenizer, progress=False)
    assert "starting over" in capsys.readouterr().err
    fresh = build_dataset(files, tmp_path / "fresh", data_tokenizer, progress=False)
    assert shard_bytes(out) == shard_bytes(fresh)


KILLED_BUILD = """
import sys
from minigpt.data import build
from minigpt.tokenizer import Tokenizer
build.CHUNK_BYTES = 16384
build.build_dataset(sys.argv[3:], sys.argv[2], Tokenizer(sys.argv[1]), val_fraction=0.1, progress=False,
                    checkpoint_seconds=0)
"""


@pytest.mark.integration
def test_a_killed_build_continues_where_its_last_progress_record_was(tmp_path, data_tokenizer, demo_corpus):
    """SIGKILL at an arbitrary moment (mid-write): the files past the progress record are cut back on resume."""
    files = [str(p) for p in corpus_files(tmp_path, demo_corpus)]
    big = tmp_path / "big.jsonl"
    paragraphs = [p for p in demo_corpus.read_text().split("\n\n") if p.strip()]
    big.write_text("".join(json.dumps({"text": f"{n}: {p}"}) + "\n" for n in range(8) for p in paragraphs))
    files.append(str(big))
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(data_tokenizer.directory), str(out), *files],
                               env=env)
    progress_file = tmp_path / ".ds.partial" / PROGRESS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress_file.read_text())["position"]["file"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and progress_file.exists()
    build_dataset(files, out, data_tokenizer, val_fraction=0.1, progress=False)
    whole = build_dataset(files, tmp_path / "whole", data_tokenizer, val_fraction=0.1, progress=False)
    assert shard_bytes(out) == shard_bytes(whole)
    assert stats_without_time(out) == stats_without_time(whole)


PEAK_RSS = """
import resource, sys
from minigpt.data.build import build_dataset
from minigpt.tokenizer import Tokenizer
build_dataset([sys.argv[2]], sys.argv[3], Tokenizer(sys.argv[1]), val_fraction=0.05, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.integration
def test_memory_does_not_grow_with_the_input(tmp_path, data_tokenizer, demo_corpus):
    """Peak RSS of a build of 8 MB and of 80 MB of JSONL: the 72 MB more input (~20M tokens) may add little."""
    paragraphs = [p for p in demo_corpus.read_text().split("\n\n") if p.strip()]
    record = "".join(json.dumps({"text": p}) + "\n" for p in paragraphs).encode()
    peaks = {}
    for megabytes in (8, 80):
        path = tmp_path / f"in{megabytes}.jsonl"
        with open(path, "wb") as handle:
            for _copy in range(megabytes * 2**20 // len(record) + 1):
                handle.write(record)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(data_tokenizer.directory), str(path),
                                 str(tmp_path / f"out{megabytes}")], env=env, capture_output=True, text=True,
                                check=True)
        peaks[megabytes] = int(result.stdout.split()[-1])
        tokens = json.loads((tmp_path / f"out{megabytes}" / STATS_FILE).read_text())["totals"]["tokens"]
        path.unlink()
    growth = peaks[80] - peaks[8]
    assert tokens * 2 > 30 * 2**20  # the larger build's tokens alone would be far more than the bound
    assert growth < 10 * 2**20, f"peak RSS {peaks[8] / 2**20:.0f} MB -> {peaks[80] / 2**20:.0f} MB"


def test_a_second_build_of_the_same_output_at_the_same_time_is_refused(tmp_path, data_tokenizer, demo_corpus):
    from minigpt.fsutil import held

    partial = tmp_path / ".ds.partial"
    partial.mkdir()
    with held(partial), pytest.raises(build.DatasetBuildError, match="another pretokenize is writing"):
        build_dataset([demo_corpus], tmp_path / "ds", data_tokenizer, progress=False)
    assert partial.exists()  # the running build's directory is left alone


@pytest.fixture
def python_default_sigint():
    """SIGINT as on a command line: the build takes Ctrl-C over only where it is Python's default, and an earlier
    in-process test may have left another handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_the_progress_of_every_block_written_then_stops(tmp_path, data_tokenizer, demo_corpus,
                                                                     monkeypatch, python_default_sigint):
    files = corpus_files(tmp_path, demo_corpus)
    monkeypatch.setattr(build, "CHUNK_BYTES", 8192)
    whole = build_dataset(files, tmp_path / "whole", data_tokenizer, val_fraction=0.1, progress=False)
    blocks, check = [], build._check

    def check_then_ctrl_c(encoded, stats, strict):  # Ctrl-C while the 5th block is being written
        blocks.append(encoded)
        if len(blocks) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return check(encoded, stats, strict)

    monkeypatch.setattr(build, "_check", check_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(files, tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False,
                      checkpoint_seconds=3600)
    assert len(blocks) == 5  # it stopped after the block in hand
    progress = json.loads((tmp_path / ".ds.partial" / PROGRESS_FILE).read_text())
    assert progress["shard"]["documents"] == sum(len(b.lengths) for b in blocks)  # saved by the stop, not a timer
    assert progress["position"]["offset"] == blocks[-1].end
    monkeypatch.setattr(build, "_check", check)
    resumed = build_dataset(files, tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False)
    assert shard_bytes(resumed) == shard_bytes(whole)


def test_a_build_stopped_before_its_split_only_splits_when_run_again(tmp_path, data_tokenizer, demo_corpus):
    files = corpus_files(tmp_path, demo_corpus)
    whole = build_dataset(files, tmp_path / "whole", data_tokenizer, val_fraction=0.1, progress=False)

    def stop_when_read(progress):
        if progress.done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(files, tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False,
                      on_checkpoint=stop_when_read)
    encoded_again = []
    resumed = build_dataset(files, tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False,
                            on_checkpoint=encoded_again.append)
    assert encoded_again == []  # nothing was read again
    assert shard_bytes(resumed) == shard_bytes(whole)
    assert stats_without_time(resumed) == stats_without_time(whole)


def test_a_resumed_build_drops_the_duplicates_of_what_it_read_before(tmp_path, data_tokenizer, demo_corpus,
                                                                     monkeypatch):
    from minigpt.data.cleaning import Cleaning

    files = corpus_files(tmp_path, demo_corpus)
    copy = tmp_path / "d.jsonl"
    copy.write_bytes(files[1].read_bytes())  # every record of b.jsonl again, in the last file
    files.append(copy)
    monkeypatch.setattr(build, "CHUNK_BYTES", 8192)
    cleaning = Cleaning(dedup=True)
    positions = []
    whole = build_dataset(files, tmp_path / "whole", data_tokenizer, progress=False, cleaning=cleaning,
                          checkpoint_seconds=0, on_checkpoint=lambda p: positions.append(p.position.file))
    assert stats_without_time(whole)["totals"]["dropped"]["duplicate"] >= 198
    with pytest.raises(KeyboardInterrupt):  # after b.jsonl, before its copy, whose records are all duplicates
        build_dataset(files, tmp_path / "ds", data_tokenizer, progress=False, cleaning=cleaning,
                      checkpoint_seconds=0, on_checkpoint=interrupted_after(positions.index(2) + 1))
    assert json.loads((tmp_path / ".ds.partial" / PROGRESS_FILE).read_text())["position"]["file"] == 2
    resumed = build_dataset(files, tmp_path / "ds", data_tokenizer, progress=False, cleaning=cleaning)
    assert shard_bytes(resumed) == shard_bytes(whole)
    assert stats_without_time(resumed) == stats_without_time(whole)


def test_a_parquet_build_resumes_by_row_and_gives_the_same_shards_in_workers(tmp_path, data_tokenizer,
                                                                              monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"text": None if i % 17 == 0 else f"Row {i}: the quick brown fox.\n学而时习之 {i}"} for i in range(600)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    monkeypatch.setattr(build, "CHUNK_RECORDS", 64)
    whole = build_dataset([path], tmp_path / "whole", data_tokenizer, val_fraction=0.1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([path], tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False,
                      checkpoint_seconds=0, on_checkpoint=interrupted_after(4))
    assert json.loads((tmp_path / ".ds.partial" / PROGRESS_FILE).read_text())["position"]["line"] > 1
    resumed = build_dataset([path], tmp_path / "ds", data_tokenizer, val_fraction=0.1, progress=False)
    assert shard_bytes(resumed) == shard_bytes(whole)
    assert stats_without_time(resumed) == stats_without_time(whole)
    monkeypatch.setattr(build, "IN_PROCESS_BYTES", 0)
    pool = build_dataset([path], tmp_path / "pool", data_tokenizer, workers=2, val_fraction=0.1, progress=False)
    assert shard_bytes(pool) == shard_bytes(whole)
