"""Walk the whole stack once, loudly: config snapshot, first batch, one optimizer step, generation.

    python launch/debug_fullstack.py --mode pretrain --model-size tiny --prompt "The"

Uses the real Trainer (same data resolution, engine, objective and loop step as training), so what it
prints is what training sees. Any TrainConfig flag is accepted too (e.g. --data, --out).
"""

from __future__ import annotations

import argparse
import json
import sys

from minigpt.cli.args import add_dataclass_arguments, dataclass_from_args
from minigpt.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/debug_fullstack.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    parser.add_argument("--model-size", dest="config", default=argparse.SUPPRESS, help="alias of --config")
    parser.add_argument("--prompt", default="The", help="prompt to generate from after the step")
    parser.add_argument("--show-tokens", type=int, default=48, help="tokens of the first sample to print")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out == "":
        args.out = f"checkpoints/debug_{args.mode}_{args.config}"
    args.max_steps = 1
    args.warmup_steps = 0
    cfg = dataclass_from_args(TrainConfig, args)

    from minigpt.data.datasets import IGNORE_INDEX
    from minigpt.train.loop import Trainer

    trainer = Trainer(cfg)
    say = print if trainer.engine.is_main else (lambda *a, **k: None)
    say("== config snapshot ==")
    say(json.dumps(json.loads((cfg.run_dir / "training_config_snapshot.json").read_text()), indent=2))
    batches = trainer.micro_batches()
    first = batches[0]
    ids = first["input_ids"][0, :args.show_tokens].tolist()
    say("== first batch ==")
    for name, tensor in first.items():
        say(f"{name:<12} shape={tuple(tensor.shape)} dtype={tensor.dtype}")
    say(f"raw text     {trainer.tokenizer.render(ids)!r}")
    say(f"token ids    {ids}")
    say(f"pieces       {[trainer.tokenizer.id_to_piece(i) for i in ids]}")
    if "labels" in first:
        mask = (first["labels"][0, :args.show_tokens] != IGNORE_INDEX).int().tolist()
        say(f"loss mask    {mask}")
    loss, result, tokens, _stats = trainer.train_step(batches)
    say("== one optimizer step ==")
    say(f"loss {loss:.4f}  grad-norm {result.grad_norm:.4f}  lr {result.lr:.2e}  tokens {tokens}")
    trainer.cfg.sample_prompt = args.prompt
    text = trainer.sample()
    say("== generation ==")
    say(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
