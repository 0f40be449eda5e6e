"""Shard format and datasets: the stream is reproduced, masks are right, and bad shards are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minigpt.data.build import build_dataset
from minigpt.data.datasets import IGNORE_INDEX, DPOPairs, PretrainWindows, RLHFPrompts, SFTExamples
from minigpt.data.shards import (
    ShardError,
    ShardReader,
    ShardWriter,
    open_shard,
    token_dtype,
)

PARAGRAPHS = ["The first document.\nIt has two lines.", "Second one, 第二。", "Third: 3 + 4 = 7 😀",
              "Fourth document is a little longer than the others, with more words in it."]


@pytest.fixture
def text_dataset(tmp_path, data_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return build_dataset([corpus], tmp_path / "ds", data_tokenizer, val_fraction=0.0, progress=False)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_shards_reproduce_the_token_stream(text_dataset, data_tokenizer):
    reader = open_shard(text_dataset, "train", tokenizer_checksum=data_tokenizer.checksum,
                        vocab_size=data_tokenizer.vocab_size, kind="pretrain")
    expected = [data_tokenizer.encode(p) + [data_tokenizer.eos_id] for p in PARAGRAPHS]
    assert reader.num_documents == len(PARAGRAPHS)
    assert [reader.document(i).tolist() for i in range(reader.num_documents)] == expected
    assert reader.tokens.tolist() == sum(expected, [])
    assert reader.tokens.dtype == np.uint16 and not reader.tokens.flags.writeable
    assert [data_tokenizer.decode(reader.document(i)[:-1]) for i in range(4)] == PARAGRAPHS
    assert open_shard(text_dataset, "val").num_documents == 0


def test_pretrain_windows_tile_the_stream_with_next_token_labels(text_dataset):
    reader = open_shard(text_dataset)
    windows = PretrainWindows(reader, seq_len=8, segment_ids=True)
    assert len(windows) == (reader.num_tokens - 1) // 8
    stream = reader.tokens.astype(np.int64)
    for index in range(len(windows)):
        sample = windows[index]
        assert {k: v.dtype for k, v in sample.items()} == {k: np.int64 for k in ("input_ids", "labels", "segment_ids")}
        assert sample["input_ids"].tolist() == stream[index * 8:index * 8 + 8].tolist()
        assert sample["labels"].tolist() == stream[index * 8 + 1:index * 8 + 9].tolist()
        starts = np.concatenate([[0], (sample["input_ids"][:-1] == 3).cumsum()])  # a new segment after each EOS
        assert sample["segment_ids"].tolist() == starts.tolist()
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_sft_examples_train_only_on_assistant_tokens(tmp_path, data_tokenizer):
    conversation = [{"role": "user", "content": "Add 2+3"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "Reverse abc"}, {"role": "assistant", "content": "cba"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": conversation}])
    reader = open_shard(build_dataset([path], tmp_path / "ds", data_tokenizer, kind="sft", val_fraction=0,
                                      progress=False), kind="sft")
    chat = data_tokenizer.encode_chat(conversation)
    examples = SFTExamples(reader, seq_len=64, pad_id=data_tokenizer.pad_id)
    sample = examples[0]
    n = len(chat.ids) - 1
    assert sample["input_ids"][:n].tolist() == chat.ids[:-1]
    assert (sample["input_ids"][n:] == data_tokenizer.pad_id).all()
    trained = sample["labels"] != IGNORE_INDEX
    assert trained.tolist() == [bool(m) for m in chat.assistant_mask[1:]] + [False] * (64 - n)
    assert data_tokenizer.render(sample["labels"][trained]) == "5<|im_end|>cba<|im_end|>"
    assert examples.num_truncated == 0
    short = SFTExamples(reader, seq_len=10, pad_id=0)
    assert short.num_truncated == 1 and short[0]["input_ids"].tolist() == chat.ids[:10]


def test_dpo_pairs_mask_the_prompt_and_keep_the_responses(tmp_path, data_tokenizer):
    prompt = [{"role": "user", "content": "Add 2+3"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Add 20+30"}]
    path = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": prompt, "chosen": "50", "rejected": "40"}])
    reader = open_shard(build_dataset([path], tmp_path / "ds", data_tokenizer, kind="dpo", val_fraction=0,
                                      progress=False))
    pairs = DPOPairs(reader, seq_len=96, pad_id=0)
    assert len(pairs) == 1 and pairs.num_truncated == 0
    assert DPOPairs(reader, seq_len=20, pad_id=0).num_truncated == 1
    sample = pairs[0]
    for side, answer in (("chosen", "50"), ("rejected", "40")):
        labels = sample[f"{side}_labels"]
        response = labels[labels != IGNORE_INDEX]
        assert response.tolist() == data_tokenizer.encode(answer) + [data_tokenizer.im_end_id]
        full = data_tokenizer.encode_chat(prompt + [{"role": "assistant", "content": answer}]).ids
        assert sample[f"{side}_input_ids"][:len(full) - 1].tolist() == full[:-1]


def test_rlhf_prompts_end_with_the_assistant_header_and_keep_references(tmp_path, data_tokenizer):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "Add 2+3", "reference": "5", "task": "add"},
                                               {"prompt": "Say hi"}])
    reader = open_shard(build_dataset([path], tmp_path / "ds", data_tokenizer, kind="rlhf", val_fraction=0,
                                      progress=False))
    prompts = RLHFPrompts(reader)
    expected = data_tokenizer.encode_chat([{"role": "user", "content": "Add 2+3"}], add_generation_prompt=True)
    assert prompts[0]["prompt_ids"].tolist() == expected.ids
    assert prompts.reference(0) == "5" and prompts.record(0)["task"] == "add"
    assert prompts.reference(1) is None


def test_datasets_refuse_shards_of_another_kind(text_dataset):
    reader = open_shard(text_dataset)
    for make in (lambda: SFTExamples(reader, 8, 0), lambda: DPOPairs(reader, 8, 0), lambda: RLHFPrompts(reader)):
        with pytest.raises(ShardError, match="kind 'pretrain'"):
            make()


def test_wide_vocabularies_use_uint32(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    writer = ShardWriter(tmp_path / "shard", vocab_size=70000, kind="pretrain", tokenizer_checksum="abc")
    writer.add([1, 69999, 3])
    writer.close()
    reader = ShardReader(tmp_path / "shard")
    assert reader.tokens.dtype == np.uint32 and reader.document(0).tolist() == [1, 69999, 3]
    with pytest.raises(ShardError, match="outside the vocabulary"):
        ShardWriter(tmp_path / "other", vocab_size=100, kind="pretrain", tokenizer_checksum="abc").add([100])


def _edit_meta(dataset, **changes):
    meta_path = dataset / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train" / "tokens.bin").write_bytes((d / "train" / "tokens.bin").read_bytes()[:-2]),
     r"train/tokens.bin: \d+ bytes, meta.json promises"),
    (lambda d: (d / "train" / "offsets.bin").write_bytes(b"\0" * 8), r"train/offsets.bin: 8 bytes"),
    (lambda d: (d / "train" / "meta.json").unlink(), r"train/meta.json: missing"),
    (lambda d: (d / "train" / "meta.json").write_text("{not json"), r"train/meta.json: not valid JSON"),
    (lambda d: _edit_meta(d, format_version=99), r"train/meta.json: shard format version 99, this MiniGPT reads "
                                                  r"version 1"),
    (lambda d: _edit_meta(d, format_version=None), r"train/meta.json: shard format version None, this MiniGPT "
                                                    r"reads version 1"),
    (lambda d: _edit_meta(d, dtype="uint32"), r"train/meta.json: dtype 'uint32'"),
    (lambda d: _edit_meta(d, tokenizer_checksum="0" * 64), r"train/meta.json: built with tokenizer 000000000000"),
    (lambda d: _edit_meta(d, vocab_size=601), r"train/meta.json: vocabulary of 601 tokens"),
    (lambda d: _edit_meta(d, kind="sft"), r"train/loss_mask.bin: missing"),
])
def test_damaged_or_foreign_shards_are_refused_naming_the_file(text_dataset, data_tokenizer, damage, message):
    damage(text_dataset)
    with pytest.raises(ShardError, match=message):
        open_shard(text_dataset, "train", tokenizer_checksum=data_tokenizer.checksum,
                   vocab_size=data_tokenizer.vocab_size, kind="pretrain")


def test_shards_of_another_kind_are_refused(text_dataset):
    with pytest.raises(ShardError, match="train/meta.json: shards of kind 'pretrain', this run needs 'sft'"):
        open_shard(text_dataset, "train", kind="sft")


def test_missing_split_is_refused(tmp_path):
    with pytest.raises(ShardError, match="no such shard directory"):
        open_shard(tmp_path, "train")
