"""SFT with `--pack` against one padded conversation per sequence, on a mixed-length chat set.

    python bench/sft_packing.py                  # tiny preset, context 256, batch 8, 60 steps each
    python bench/sft_packing.py --steps 200 --json out.json
    python bench/sft_packing.py --quick          # plumbing check: the figures mean nothing

The chat set is generated deterministically: the built-in SFT demo tasks (one short turn each) and,
one conversation in three, 2-12 of those tasks asked in a row (long multi-turn chats, a few longer than
the context and cut). Both variants train the same fresh model (same seed, same AdamW recipe through
`PlainEngine` and the `sft` objective) for the same number of steps of the same batch size, their steps
interleaved (padded, packed, padded, ...) so that both see the same machine load. Reported per variant:
useful tokens/s (assistant-labelled tokens, the only ones that take a loss, over the whole step
including batch assembly), the share of positions that are padding, and the validation loss per
assistant token on the same held-out conversations (evaluated unpacked for both; packed evaluation
gives the same figure, as `tests/test_sft_packing.py` proves).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minigpt.config import PRESETS, TrainConfig  # noqa: E402
from minigpt.data.build import build_dataset  # noqa: E402
from minigpt.data.datasets import IGNORE_INDEX, PackedSFTExamples, SFTExamples  # noqa: E402
from minigpt.data.demo import demo_post_training_records, write_demo_corpus  # noqa: E402
from minigpt.data.prefetch import collate  # noqa: E402
from minigpt.data.sampler import ResumableSampler  # noqa: E402
from minigpt.data.shards import open_shard  # noqa: E402
from minigpt.engine.plain import PlainEngine  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.modes import build_objective  # noqa: E402
from minigpt.tokenizer_training import train_tokenizer  # noqa: E402

GOAL_SPEEDUP = 2.0
"""Useful tokens/s of the packed run against the padded one, at equal or better validation loss."""


def mixed_length_chats(count: int, seed: int = 0) -> list[dict]:
    """`count` SFT records: demo tasks one per conversation, and one in three a chat of 2-12 of them."""
    tasks = demo_post_training_records("sft", 3 * count, seed=seed)
    rng = random.Random(seed)
    records, used = [], 0
    for index in range(count):
        turns = rng.randint(2, 12) if index % 3 == 2 else 1
        messages = [m for record in tasks[used:used + turns] for m in record["conversations"]]
        used += turns
        records.append({"conversations": messages})
    return records


@dataclass
class PackingResult:
    """One variant's figures over the same steps."""

    variant: str
    sequences: int
    conversations: int
    useful_tokens_per_sec: float
    padding_share: float
    step_ms: float
    train_loss: float
    val_loss: float


def build_chat_set(work: Path, count: int, vocab: int) -> tuple[Path, object]:
    path = work / "chats.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed_length_chats(count)),
                    encoding="utf-8")
    corpus = write_demo_corpus(work / "demo.txt")
    tokenizer = train_tokenizer([corpus, path], work / "tokenizer", vocab_size=vocab)
    shards = build_dataset([path], work / "sft", tokenizer, kind="sft", val_fraction=0.05, seed=0, progress=False)
    return shards, tokenizer


def val_loss(model, objective, dataset, batch_size: int) -> float:
    model.eval()
    sums = objective.new_eval_sums()
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        objective.eval_batch(model, collate(samples, torch.device("cpu")), sums)
    model.train()
    return sums["loss_sum"] / sums["tokens"]


def compare(work: Path, steps: int, batch_size: int, seq_len: int, count: int, preset: str = "tiny",
            vocab: int = 2000) -> list[PackingResult]:
    shards, tokenizer = build_chat_set(work, count, vocab)
    train = open_shard(shards, "train", tokenizer_checksum=tokenizer.checksum, vocab_size=tokenizer.vocab_size)
    val = open_shard(shards, "val", tokenizer_checksum=tokenizer.checksum, vocab_size=tokenizer.vocab_size)
    model_config = PRESETS[preset].__class__(**{**asdict(PRESETS[preset]), "vocab_size": tokenizer.vocab_size,
                                                "max_seq_len": seq_len})
    variants = {}
    for name, pack in (("padded", False), ("packed", True)):
        cfg = TrainConfig.of(mode="sft", pack=pack, batch_size=batch_size, max_steps=steps, warmup_steps=max(1, steps // 20),
                          precision="fp32", compile="off", seed=0)
        torch.manual_seed(0)
        engine = PlainEngine(MiniGPT(model_config), cfg, torch.device("cpu"))
        objective = build_objective(cfg, tokenizer)
        dataset = objective.dataset(train, seq_len, tokenizer)
        sampler = ResumableSampler(len(dataset), batch_size, 1, seed=0)
        variants[name] = dict(engine=engine, objective=objective, dataset=dataset, sampler=sampler,
                              seconds=0.0, useful=0, positions=0, losses=[])
    for _step in range(steps):
        for state in variants.values():  # interleaved: both variants see the same machine load
            started = time.perf_counter()
            batch = collate([state["dataset"][i] for i in state["sampler"].next_step()[0]], torch.device("cpu"))
            loss, _stats = state["objective"].loss(state["engine"], batch)
            state["engine"].backward(loss)
            state["engine"].step()
            state["seconds"] += time.perf_counter() - started
            state["useful"] += int((batch["labels"] != IGNORE_INDEX).sum())
            state["positions"] += batch["labels"].numel()
            state["losses"].append(loss.item())
    held_out = SFTExamples(val, seq_len, pad_id=tokenizer.pad_id)
    results = []
    for name, state in variants.items():
        dataset = state["dataset"]
        conversations = dataset.num_conversations if isinstance(dataset, PackedSFTExamples) else len(dataset)
        real = sum(int((dataset[i]["input_ids"] != tokenizer.pad_id).sum()) for i in range(len(dataset)))
        results.append(PackingResult(
            variant=name, sequences=len(dataset), conversations=conversations,
            useful_tokens_per_sec=state["useful"] / state["seconds"],
            padding_share=1 - real / (len(dataset) * seq_len), step_ms=1000 * state["seconds"] / steps,
            train_loss=float(np.mean(state["losses"][-max(1, steps // 10):])),
            val_loss=val_loss(state["engine"].module, state["objective"], held_out, batch_size)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: plumbing check, figures meaningless")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.conversations, args.seq_len, args.batch_size = 4, 200, 128, 4
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as work:
        padded, packed = compare(Path(work), args.steps, args.batch_size, args.seq_len, args.conversations,
                                 args.preset)
    speedup = packed.useful_tokens_per_sec / padded.useful_tokens_per_sec
    print(f"{args.preset}, context {args.seq_len}, batch {args.batch_size}, {args.steps} steps each (interleaved)")
    print(f"{'variant':<8} {'sequences':>9} {'convs':>6} {'padding':>8} {'step ms':>8} {'useful tok/s':>13} "
          f"{'train loss':>10} {'val loss':>9}")
    for r in (padded, packed):
        print(f"{r.variant:<8} {r.sequences:>9,} {r.conversations:>6,} {r.padding_share:>8.1%} {r.step_ms:>8.0f} "
              f"{r.useful_tokens_per_sec:>13,.0f} {r.train_loss:>10.3f} {r.val_loss:>9.3f}")
    ok = speedup >= GOAL_SPEEDUP and packed.val_loss <= padded.val_loss
    print(f"packed / padded useful tokens/s: {speedup:.2f}x (goal >= {GOAL_SPEEDUP:.1f}x at equal or better val "
          f"loss: {'pass' if ok else 'FAIL'})")
    if args.json:
        args.json.write_text(json.dumps({"speedup": speedup, "pass": ok,
                                         "results": [asdict(padded), asdict(packed)]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
