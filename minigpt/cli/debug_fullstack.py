"""Walk the whole stack once, loudly: config snapshot, first batch, one optimizer step, generation.

    python launch/debug_fullstack.py --mode pretrain --model-size tiny --prompt "The"

Uses the real Trainer (same data resolution, engine, objective and loop step as training), so what it
prints is what training sees. Any TrainConfig flag is accepted too (e.g. --data, --out).
"""

from __future__ import annotations

import argparse
import json
import sys

from minigpt.cli.args import FlagParser, add_dataclass_arguments, dataclass_from_args
from minigpt.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="launch/debug_fullstack.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    parser.add_argument("--model-size", dest="config", default=argparse.SUPPRESS, help="alias of --config")
    parser.add_argument("--prompt", default="", help="prompt to generate from after the step (default: from the "
                        "data, as --sample-prompt; answered as a chat turn in sft, dpo and rlhf)")
    parser.add_argument("--show-tokens", type=int, default=48, help="tokens of the first sample to print")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out == "":  # its own scratch directory, replaced on every walk
        args.out = f"checkpoints/debug_{args.mode}_{args.config}"
        args.overwrite = True
    args.max_steps = 1
    args.warmup_steps = 0
    cfg = dataclass_from_args(TrainConfig, args)

    from minigpt.train.loop import USER_ERRORS

    try:
        return walk(cfg, args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _first_ids_key(batch: dict) -> str:
    """The batch's token ids: `input_ids`, or each mode's own (`chosen_input_ids`, `prompt_ids`)."""
    return next(name for name in ("input_ids", "chosen_input_ids", "prompt_ids") if name in batch)


def walk(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Build the real Trainer, show its first batch, take one optimizer step and generate."""
    import torch

    from minigpt.checkpoint import rng_state, set_rng_state
    from minigpt.data.datasets import IGNORE_INDEX
    from minigpt.train.loop import Trainer

    trainer = Trainer(cfg)
    say = print if trainer.engine.is_main else (lambda *a, **k: None)
    say("== config snapshot ==")
    say(json.dumps(json.loads((cfg.run_dir / "training_config_snapshot.json").read_text()), indent=2))
    random_state = rng_state()
    trainer.objective.setup(trainer.setup_context())  # e.g. DPO's reference, RLHF's reward: as run() does
    set_rng_state(random_state)
    batches = trainer.micro_batches()
    # A dict of tensors, or the objective's own micro-batch (RLHF's Rollout: sampled responses and rewards)
    first = {name: value for name, value in (batches[0] if isinstance(batches[0], dict) else vars(batches[0])).items()
             if isinstance(value, torch.Tensor)}
    ids_key = _first_ids_key(first)
    ids = first[ids_key][0, :args.show_tokens].tolist()
    say("== first batch ==")
    for name, tensor in first.items():
        say(f"{name:<20} shape={tuple(tensor.shape)} dtype={tensor.dtype}")
    say(f"raw text     {trainer.tokenizer.render(ids)!r}  ({ids_key}[0])")
    say(f"token ids    {ids}")
    say(f"pieces       {[trainer.tokenizer.id_to_piece(i) for i in ids]}")
    labels_key = ids_key.replace("input_ids", "labels")
    if labels_key in first and labels_key != ids_key:
        mask = (first[labels_key][0, :args.show_tokens] != IGNORE_INDEX).int().tolist()
        say(f"loss mask    {mask}")
    loss, result, tokens, _stats = trainer.train_step(batches)
    say("== one optimizer step ==")
    say(f"loss {loss:.4f}  grad-norm {result.grad_norm:.4f}  lr {result.lr:.2e}  tokens {tokens}")
    if args.prompt:
        trainer.sample_prompt = args.prompt
        unseen = trainer.tokenizer.unseen_characters(args.prompt)
        if unseen:
            say(f"hint: the tokenizer {trainer.tokenizer.directory} has not seen {unseen!r} (e.g. the demo "
                "tokenizer is English-only): they go as bytes and the generation below looks garbled; train on "
                "text that has them (--data FILES --retrain-tokenizer)")
    text = trainer.sample()
    say("== generation ==")
    say(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
