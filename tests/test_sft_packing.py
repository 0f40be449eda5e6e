"""`--pack`: several SFT conversations per sequence, each trained exactly as if it were alone.

The packed loss equals the sum of the conversations' losses computed one by one, attention never crosses
from one conversation into another, every conversation is placed exactly once, and a packed run resumes
bitwise through the real `Trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt.cli.args import add_train_arguments, train_config_from_args
from minigpt.config import PRESETS, ConfigError, TrainConfig
from minigpt.data.build import build_dataset
from minigpt.data.datasets import IGNORE_INDEX, PackedSFTExamples, SFTExamples, pack_best_fit
from minigpt.data.sampler import SamplerError
from minigpt.data.shards import open_shard
from minigpt.model import MiniGPT
from minigpt.signals import EXIT_FINISHED
from minigpt.train.loop import Trainer

SEQ_LEN = 128
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=SEQ_LEN)
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()


def chat_records(count: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-3 turns and very different lengths, a few longer than any sequence."""
    rng = random.Random(seed)
    records = []
    for _index in range(count):
        turns = []
        for _turn in range(rng.choice([1, 1, 1, 2, 3])):
            turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))})
        records.append({"conversations": turns})
    return records


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory, data_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("chats")
    path = root / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records(160)), encoding="utf-8")
    return build_dataset([path], root / "sft", data_tokenizer, kind="sft", val_fraction=0.1, seed=0, progress=False)


@pytest.fixture(scope="module")
def reader(chat_shards, data_tokenizer):
    return open_shard(chat_shards, "train", tokenizer_checksum=data_tokenizer.checksum,
                      vocab_size=data_tokenizer.vocab_size)


def test_best_fit_places_every_item_once_within_capacity_deterministically():
    sizes = np.random.default_rng(0).integers(1, 65, size=500)
    members, offsets = pack_best_fit(sizes, 64)
    assert sorted(members.tolist()) == list(range(500))
    fills = [int(sizes[members[a:b]].sum()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert max(fills) <= 64 and min(fills) > 0
    assert len(fills) <= int(np.ceil(sizes.sum() / 64) * 1.1) + 1  # close to the fewest bins possible
    again = pack_best_fit(sizes, 64)
    assert np.array_equal(again[0], members) and np.array_equal(again[1], offsets)


def test_packed_samples_hold_every_conversation_once_with_its_labels(reader, data_tokenizer):
    padded = SFTExamples(reader, SEQ_LEN, data_tokenizer.pad_id)
    packed = PackedSFTExamples(reader, SEQ_LEN, data_tokenizer.pad_id)
    assert sorted(packed.members.tolist()) == list(range(len(padded)))
    assert packed.num_truncated == padded.num_truncated > 0  # the long ones are cut, as without packing
    assert len(packed) < len(padded) / 2
    labelled = sum(int((padded[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(padded)))
    assert labelled == sum(int((packed[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(packed)))
    sample = packed[0]
    assert set(sample) == {"input_ids", "labels", "segment_ids", "position_ids"}
    assert all(v.shape == (SEQ_LEN,) and v.dtype == np.int64 for v in sample.values())
    starts = np.flatnonzero(np.diff(sample["segment_ids"], prepend=-1))
    assert (sample["position_ids"][starts] == 0).all()  # positions restart with each conversation


def _loss_sum(model, sample: dict[str, np.ndarray], **packing) -> torch.Tensor:
    batch = {k: torch.from_numpy(v)[None] for k, v in sample.items()}
    extra = {k: batch[k] for k in packing}
    logits = model(batch["input_ids"], **extra)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def test_packed_loss_equals_the_sum_of_the_conversations_losses_one_by_one(reader, data_tokenizer):
    torch.manual_seed(0)
    model = MiniGPT(dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size)).eval()
    padded = SFTExamples(reader, SEQ_LEN, data_tokenizer.pad_id)
    packed = PackedSFTExamples(reader, SEQ_LEN, data_tokenizer.pad_id)
    several = [i for i in range(len(packed)) if packed.offsets[i + 1] - packed.offsets[i] >= 3][:4]
    assert several
    with torch.no_grad():
        for index in several:
            together = _loss_sum(model, packed[index], segment_ids=True, position_ids=True)
            conversations = packed.members[packed.offsets[index]:packed.offsets[index + 1]]
            one_by_one = sum(_loss_sum(model, padded[int(c)]) for c in conversations)
            assert torch.allclose(together, one_by_one, rtol=1e-5, atol=1e-5), (together, one_by_one)
            # without its segments the same sequence gives other logits: the conversations would see each other
            ids = torch.from_numpy(packed[index]["input_ids"])[None]
            segments = torch.from_numpy(packed[index]["segment_ids"])[None]
            assert not torch.allclose(model(ids), model(ids, segment_ids=segments), atol=1e-4)


def test_attention_never_crosses_from_one_conversation_into_another(reader, data_tokenizer):
    torch.manual_seed(0)
    model = MiniGPT(dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size)).eval()
    packed = PackedSFTExamples(reader, SEQ_LEN, data_tokenizer.pad_id)
    index = next(i for i in range(len(packed)) if packed.offsets[i + 1] - packed.offsets[i] >= 3)
    sample = {k: torch.from_numpy(v)[None] for k, v in packed[index].items()}
    changed = sample["input_ids"].clone()
    first = sample["segment_ids"] == 0
    changed[first] = torch.randint(4, data_tokenizer.vocab_size, (int(first.sum()),))
    with torch.no_grad():
        before = model(sample["input_ids"], segment_ids=sample["segment_ids"], position_ids=sample["position_ids"])
        after = model(changed, segment_ids=sample["segment_ids"], position_ids=sample["position_ids"])
    assert not torch.allclose(before[first], after[first])
    assert torch.equal(before[~first], after[~first])  # the other conversations do not see the change


@pytest.fixture(autouse=True)
def own_directory(tmp_path, monkeypatch):
    """SFT starts from checkpoints/pretrain_<preset> when the working directory has one (a repository where the
    quick start ran): these runs start from random weights wherever the tests run."""
    monkeypatch.chdir(tmp_path)


def run(out: Path, data: Path, data_dir: Path, **options) -> list[dict]:
    cfg = TrainConfig.of(mode="sft", config="tiny", data=[str(data)], data_dir=str(data_dir), out=str(out),
                      seq_len=SEQ_LEN, batch_size=4, max_steps=4, warmup_steps=1, eval_interval=0, eval_batches=2,
                      save_interval=2, log_interval=100, sample_prompt="a", **options)
    assert Trainer(cfg).run() == EXIT_FINISHED
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") in ("train", "val")]


def test_a_packed_run_trains_evaluates_and_resumes_bitwise(tmp_path, chat_shards, data_tokenizer, monkeypatch,
                                                           capsys):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    tokenizer = str(data_tokenizer.directory)
    rows = run(tmp_path / "packed", chat_shards, tmp_path, pack=True, tokenizer=tokenizer)
    assert "sft --pack: 160 conversations in" in capsys.readouterr().out  # train + validation, said at start
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert [r for r in rows if r["split"] == "val"][-1]["val_loss"] > 0
    resumed = run(tmp_path / "resumed", chat_shards, tmp_path, pack=True, tokenizer=tokenizer,
                  resume=str(tmp_path / "packed" / "ckpt" / "step_0000002"))
    assert [r["loss"] for r in resumed if r["split"] == "train"] == [r["loss"] for r in train[2:]]
    padded = run(tmp_path / "padded", chat_shards, tmp_path, tokenizer=tokenizer)
    assert [r["loss"] for r in padded if r["split"] == "train"] != [r["loss"] for r in train]  # packing was on
    with pytest.raises(SamplerError, match="data changed since the checkpoint"):  # never resumed unpacked
        run(tmp_path / "unpacked", chat_shards, tmp_path, tokenizer=tokenizer,
            resume=str(tmp_path / "packed" / "ckpt" / "step_0000002"))


def test_pack_is_a_flag_for_sft_and_refused_by_name_elsewhere():
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert train_config_from_args(parser.parse_args(["--mode", "sft", "--pack"])).options.pack is True
    assert train_config_from_args(parser.parse_args(["--mode", "sft"])).options.pack is False
    for mode in ("pretrain", "dpo", "reward", "rlhf"):
        with pytest.raises(ConfigError, match="--pack applies to --mode sft"):
            TrainConfig.of(mode=mode, pack=True)


@pytest.mark.integration
def test_deepspeed_two_ranks_train_packed_sft_like_the_plain_engine(tmp_path, data_tokenizer):
    """The packed samples' segment and position ids reach the model through DeepSpeed's engine: two ranks
    of 4 log the losses of one plain rank accumulating the same two micro-batches (a dropped keyword would
    change every loss)."""
    pytest.importorskip("deepspeed")
    from two_engines import train_losses, train_on_both_engines

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in chat_records(160)), encoding="utf-8")
    common = ["--mode", "sft", "--pack", "--config", "tiny", "--seq-len", str(SEQ_LEN), "--max-steps", "6",
              "--warmup-steps", "1", "--eval-interval", "0", "--eval-batches", "1", "--log-interval", "1",
              "--save-interval", "0", "--sample-prompt", "a", "--data", str(chats), "--data-dir", str(tmp_path),
              "--tokenizer", str(data_tokenizer.directory), "--precision", "fp32", "--prefetch", "0"]
    train_on_both_engines(tmp_path, common, "zero1.json")
    losses = {name: train_losses(tmp_path / name) for name in ("plain", "deepspeed")}
    assert len(losses["plain"]) == len(losses["deepspeed"]) == 6
    for plain, deepspeed in zip(losses["plain"], losses["deepspeed"], strict=True):
        assert abs(plain - deepspeed) < 1e-4, losses
