"""Engine checks run under the real `deepspeed` launcher (2 ranks, CPU accelerator, gloo).

    deepspeed --num_gpus 2 tests/engine_driver.py --ds-config ds_configs/zero2.json --out DIR \
        [--plain-checkpoint DIR]

One launch does several checks so the slow launcher start is paid once: train STEPS steps saving a
checkpoint after SAVE_AT, resume that checkpoint in a fresh engine and continue, optionally continue
from a plain-engine checkpoint, and consolidate the weights. Rank 0 writes `results.json` (+ .pt files)
into DIR; tests/test_engine_deepspeed.py compares them with the plain engine. The helpers here
(tiny model, deterministic batches, `run_steps`) are shared with the tests so both sides use the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.config import MiniGPTConfig, TrainConfig  # noqa: E402
from minigpt.engine.base import Engine  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402

MODEL = MiniGPTConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_seq_len=16)
SEQ = 16
MICRO, ACCUM, WORLD = 2, 2, 2
STEPS, SAVE_AT = 6, 3


def train_config(world: int = WORLD, **overrides) -> TrainConfig:
    """Training config of the checks; the plain reference runs with grad_accum = ACCUM x world."""
    base = dict(batch_size=MICRO, grad_accum=ACCUM * (WORLD // world), learning_rate=1e-2, warmup_steps=2,
                max_steps=STEPS, min_lr_ratio=0.1, grad_clip=1.0, precision="fp32", weight_decay=0.1)
    return TrainConfig.of(**{**base, **overrides})


def fresh_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MODEL)


def global_batch(step: int) -> torch.Tensor:
    """Token ids of optimizer step `step`: MICRO x ACCUM x WORLD rows of a learnable pattern."""
    gen = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, MODEL.vocab_size, (MICRO * ACCUM * WORLD, 1), generator=gen)
    offsets = torch.arange(SEQ + 1) * 7
    return (starts + offsets) % MODEL.vocab_size


def micro_batches(step: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's micro-batches of `step`; micro-batch j of rank r is global slot j * world + r."""
    rows = global_batch(step)
    per_rank = len(rows) // (MICRO * world)
    return [rows[(j * world + rank) * MICRO:(j * world + rank + 1) * MICRO] for j in range(per_rank)]


def run_steps(engine: Engine, first: int, last: int) -> list[dict]:
    """Train optimizer steps first..last-1; return per-step mean loss (over all ranks), grad norm, lr."""
    records = []
    for step in range(first, last):
        losses = []
        batches = micro_batches(step, engine.rank, engine.world_size)
        for index, batch in enumerate(batches):
            logits = engine(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            engine.backward(loss, len(batches), last=index == len(batches) - 1)
            losses.append(loss.detach())
        result = engine.step()
        mean = engine.all_reduce_sum(torch.stack(losses).mean().reshape(1)).item() / engine.world_size
        records.append({"step": step, "loss": mean, "grad_norm": result.grad_norm, "lr": result.lr,
                        "skipped": result.skipped})
    return records


def checkpoint_dir(engine: Engine, root: Path, name: str) -> Path:
    """Create (on rank 0) an empty checkpoint directory the way the checkpoint manager does."""
    directory = root / name
    if engine.is_main:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    engine.barrier()
    return directory


def main() -> None:
    from minigpt.engine.deepspeed import DeepSpeedEngine

    parser = argparse.ArgumentParser()
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--plain-checkpoint", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    cfg = train_config(world=WORLD, precision=args.precision, ds_config=args.ds_config or "")
    results: dict = {}

    engine = DeepSpeedEngine(fresh_model(), cfg)
    assert engine.world_size == WORLD, f"run me with --num_gpus {WORLD}"
    results["uninterrupted"] = run_steps(engine, 0, SAVE_AT)
    saved = checkpoint_dir(engine, args.out, "ds_checkpoint")
    engine.save(saved)
    results["uninterrupted"] += run_steps(engine, SAVE_AT, STEPS)
    weights = engine.consolidated_state_dict()
    if engine.is_main:
        torch.save(weights, args.out / "consolidated.pt")
    # A non-finite loss on one rank: the update is skipped on every rank and the weights stay as they were.
    batch = micro_batches(STEPS, engine.rank, engine.world_size)[0]
    accumulation = len(micro_batches(STEPS, engine.rank, engine.world_size))
    for index in range(accumulation):
        loss = engine(batch[:, :-1]).float().mean() * (float("nan") if engine.rank == 1 else 1.0)
        engine.backward(loss, accumulation, last=index == accumulation - 1)
    result = engine.step()
    after = engine.consolidated_state_dict()
    if engine.is_main:
        results["nan_step"] = {"skipped": result.skipped,
                               "weights_unchanged": all(torch.equal(after[k], weights[k]) for k in weights)}

    resumed = DeepSpeedEngine(fresh_model(seed=1), cfg)
    resumed.load(saved)
    results["resumed"] = run_steps(resumed, SAVE_AT, STEPS)

    if args.plain_checkpoint:
        from_plain = DeepSpeedEngine(fresh_model(seed=2), cfg)
        from_plain.load(args.plain_checkpoint)
        results["from_plain"] = run_steps(from_plain, SAVE_AT, STEPS)
        weights = from_plain.consolidated_state_dict()
        if engine.is_main:
            torch.save(weights, args.out / "from_plain_consolidated.pt")
    # DeepSpeed's activation checkpointing recomputes each block in backward: the same run, less memory.
    recomputing = DeepSpeedEngine(fresh_model(), train_config(world=WORLD, precision=args.precision,
                                                              activation_checkpointing=True, ds_config=cfg.engine.ds_config))
    results["activation_checkpointing"] = run_steps(recomputing, 0, STEPS)
    if engine.is_main:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    engine.barrier()


if __name__ == "__main__":
    main()
