"""Mixture-of-experts checks under the real `deepspeed` launcher (2 ranks, CPU accelerator, gloo, EP=2).

    deepspeed --num_gpus 2 tests/moe_driver.py --ds-config ds_configs/zero2.json --out DIR \
        [--plain-checkpoint DIR]

One launch (the launcher start is paid once): build the tiny MoE model with its experts spread over both
ranks, record its eval logits, train STEPS steps (checkpoint after SAVE_AT), record the trained eval
logits and the consolidated weights, resume the checkpoint in a fresh engine, and continue from a
plain-engine checkpoint. Rank 0 writes results.json and .pt files into DIR; tests/test_moe.py compares
them with the plain model over the same batches. Helpers are shared with the test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_driver import ACCUM, MICRO, SAVE_AT, STEPS, WORLD, checkpoint_dir, micro_batches  # noqa: E402

from minigpt.config import MiniGPTConfig, TrainConfig  # noqa: E402
from minigpt.engine.base import Engine  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.train.objective import Objective  # noqa: E402

MODEL = MiniGPTConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                      max_seq_len=16, num_experts=4, experts_per_token=2, num_shared_experts=1,
                      moe_aux_loss_weight=0.1, moe_z_loss_weight=0.01)
PROBE = (torch.arange(2 * 15).reshape(2, 15) * 5) % MODEL.vocab_size
"""Eval input whose logits both engines must agree on."""


def train_config(world: int = WORLD, **overrides) -> TrainConfig:
    base = dict(batch_size=MICRO, grad_accum=ACCUM * (WORLD // world), learning_rate=1e-2, warmup_steps=2,
                max_steps=STEPS, min_lr_ratio=0.1, grad_clip=1.0, precision="fp32", weight_decay=0.1, ep_size=2)
    return TrainConfig.of(**{**base, **overrides})


def fresh_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MODEL)


def run_steps(engine: Engine, first: int, last: int) -> list[dict]:
    """Train steps first..last-1 on next-token loss + the model's MoE losses (the objective contract)."""
    records, objective = [], Objective()
    for step in range(first, last):
        losses, auxes = [], []
        batches = micro_batches(step, engine.rank, engine.world_size)
        for index, batch in enumerate(batches):
            logits = engine(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            extra, stats = objective.model_losses(engine)
            engine.backward(loss + extra, len(batches), last=index == len(batches) - 1)
            losses.append(loss.detach())
            auxes.append(stats["moe_aux_loss"])
        result = engine.step()
        mean = engine.all_reduce_sum(torch.stack(losses).mean().reshape(1)).item() / engine.world_size
        aux = engine.all_reduce_sum(torch.tensor([sum(auxes) / len(auxes)])).item() / engine.world_size
        records.append({"step": step, "loss": mean, "aux": aux, "grad_norm": result.grad_norm, "lr": result.lr})
    return records


@torch.no_grad()
def eval_logits(engine: Engine) -> torch.Tensor:
    engine.eval()
    logits = engine.module(PROBE.to(engine.device)).cpu()
    engine.train()
    return logits


def main() -> None:
    from minigpt.engine.deepspeed import DeepSpeedEngine

    parser = argparse.ArgumentParser()
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--plain-checkpoint", type=Path)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    cfg = train_config(ds_config=args.ds_config or "")
    results: dict = {}

    engine = DeepSpeedEngine(fresh_model(), cfg)
    assert engine.world_size == WORLD and engine.ep_size == 2, "run me with --num_gpus 2"
    results["local_experts"] = sum(1 for n, _ in engine.module.named_parameters() if "deepspeed_experts" in n)
    tensors = {"init_logits": eval_logits(engine)}
    results["uninterrupted"] = run_steps(engine, 0, SAVE_AT)
    saved = checkpoint_dir(engine, args.out, "ds_checkpoint")
    engine.save(saved)
    results["uninterrupted"] += run_steps(engine, SAVE_AT, STEPS)
    tensors["final_logits"] = eval_logits(engine)
    tensors["consolidated"] = engine.consolidated_state_dict()

    resumed = DeepSpeedEngine(fresh_model(seed=1), cfg)
    resumed.load(saved)
    results["resumed"] = run_steps(resumed, SAVE_AT, STEPS)

    if args.plain_checkpoint:
        from_plain = DeepSpeedEngine(fresh_model(seed=2), cfg)
        from_plain.load(args.plain_checkpoint)
        results["from_plain"] = run_steps(from_plain, SAVE_AT, STEPS)
        tensors["from_plain_consolidated"] = from_plain.consolidated_state_dict()
    if engine.is_main:
        torch.save(tensors, args.out / "tensors.pt")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    engine.barrier()


if __name__ == "__main__":
    main()
