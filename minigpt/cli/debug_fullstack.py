"""Walk the whole stack once, loudly: config snapshot, first batch, one optimizer step, generation.

    python launch/debug_fullstack.py --mode pretrain --model-size tiny --prompt "The"
    python launch/debug_fullstack.py --mode sft --model-size tiny --prompt "你好，MiniGPT！"

Uses the real Trainer (same data resolution, engine, objective and loop step as training), so what it
prints is what training sees. Any TrainConfig flag is accepted too (e.g. --data, --out). One batch, one
step in every mode: DPO scores that batch with a frozen reference in memory (no precomputed reference
over the whole data set). A post-training walk whose previous stage's tokenizer lacks characters of
--prompt starts from random weights with a tokenizer of its own, trained on the built-in bilingual demo
data (and raw --data files), instead; --init-from or --tokenizer choose otherwise. With --lora-rank the step
trains only the adapters (a walk with no trained weights to adapt takes one full-weight step into <out>_base
first), and the walk writes final/ as a LoRA run does: the merged weights, and the adapter in final/adapter/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.cli.args import FlagParser, add_train_arguments, train_config_from_args
from minigpt.config import ConfigError, TrainConfig, get_config
from minigpt.i18n import _

if TYPE_CHECKING:
    from minigpt.train.loop import StartingWeights, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="launch/debug_fullstack.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--model-size", dest="config", default=argparse.SUPPRESS, help=_("alias of --config"))
    parser.add_argument("--prompt", default="", help=_("prompt to generate from after the step (default: from the "
                                                       "data, as --sample-prompt; answered as a chat turn in sft, "
                                                       "dpo and rlhf)"))
    parser.add_argument("--show-tokens", type=int, default=48, help=_("tokens of the first sample to print"))
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out == "":  # its own scratch directory, replaced on every walk
        args.out = f"checkpoints/debug_{args.mode}_{args.config}"
        args.overwrite = True
    args.max_steps = 1
    args.warmup_steps = 0
    if args.mode == "dpo":
        args.dpo_reference_in_memory = True  # the reference scores this one batch, not every pair of the data
    prompt, show_tokens = args.prompt, args.show_tokens
    del args.prompt, args.show_tokens
    try:
        cfg = train_config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))
    args.prompt, args.show_tokens = prompt, show_tokens

    from minigpt.train.loop import USER_ERRORS

    try:
        return walk(cfg, args)
    except USER_ERRORS as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2


def _first_ids_key(batch: dict) -> str:
    """The batch's token ids: `input_ids`, or each mode's own (`chosen_input_ids`, `prompt_ids`)."""
    return next(name for name in ("input_ids", "chosen_input_ids", "prompt_ids") if name in batch)


def _first_row(batch: dict, ids_key: str, count: int) -> list[int]:
    """The first `count` real tokens of the batch's first row: left padding (prompts, rollouts) skipped."""
    mask_key = {"input_ids": "attention_mask", "prompt_ids": "prompt_mask"}.get(ids_key)
    row = batch[ids_key][0]
    if mask_key in batch:
        row = row[batch[mask_key][0].bool()]
    return row[:count].tolist()


def debug_start(cfg: TrainConfig, prompt: str) -> tuple[TrainConfig, StartingWeights | None]:
    """Where a post-training walk starts: the previous stage as training would, unless that stage's tokenizer
    lacks characters of `prompt`; then random weights and a tokenizer trained on bilingual data."""
    from minigpt.modes import objective_class
    from minigpt.tokenizer import Tokenizer
    from minigpt.train.loop import StartingWeights, find_starting_weights

    if not objective_class(cfg.mode).previous_stages or cfg.model.init_from or cfg.data.tokenizer or not prompt:
        return cfg, None
    if objective_class(cfg.mode).required_tokenizer(cfg.options, cfg.run_dir) is not None:
        return cfg, None  # the mode's tokenizer (distillation's: the teacher's), whatever the prompt
    start = find_starting_weights(cfg)
    if start.model_dir is None:
        return cfg.replace(tokenizer=str(train_walk_tokenizer(cfg))), start
    unseen = Tokenizer(start.model_dir).unseen_characters(prompt)
    if not unseen:
        return cfg, None
    print(_("[minigpt] debug: {model}'s tokenizer has no pieces for {unseen!r} of --prompt: walking from random "
            "weights with a tokenizer trained on the bilingual demo data instead (--init-from {model} to walk from "
            "those weights anyway)").format(model=start.model_dir, unseen=unseen), flush=True)
    return (cfg.replace(tokenizer=str(train_walk_tokenizer(cfg))),
            StartingWeights("random init (debug: the previous stage's tokenizer lacks the prompt's characters)"))


def train_walk_tokenizer(cfg: TrainConfig) -> Path:
    """`<data-dir>/cache/debug_tokenizer` (scratch, never a run's own), trained anew on the built-in demo data of every mode (English and Chinese) and the raw
    --data files, so the walk's prompt and data are spelled in pieces, not bytes."""
    from minigpt.data.demo import TOKENIZER_SAMPLE
    from minigpt.tokenizer_training import train_tokenizer
    from minigpt.train.run_data import builtin_corpus_file, demo_post_training_file, find_input

    files = [builtin_corpus_file(cfg.data.data_dir, "en")] + [demo_post_training_file(cfg.data.data_dir, kind, TOKENIZER_SAMPLE)
                                                          for kind in ("sft", "dpo", "rlhf")]
    files += [path for path in (find_input(name, cfg.data.data_dir) for name in cfg.data.sources) if path.is_file()]
    demo = files[0].parent
    vocab = cfg.data.vocab_size or get_config(cfg.model.preset).vocab_size
    print(_("[minigpt] debug: training a {vocab_size}-token tokenizer on {count} file(s) into {path}").format(
        vocab_size=vocab, count=len(files), path=demo.parent / "debug_tokenizer"), flush=True)
    return train_tokenizer(files, demo.parent / "debug_tokenizer", vocab_size=vocab).directory


def lora_base(cfg: TrainConfig, start: StartingWeights | None) -> tuple[TrainConfig, StartingWeights | None]:
    """LoRA adapts trained weights: a LoRA walk that has none takes one full-weight step of the same walk into
    `<out>_base` first, consolidated into its final/, and adapts those (`--init-from`)."""
    from minigpt.train.loop import Trainer, find_starting_weights, said_source

    if not cfg.adapter.enabled:
        return cfg, start
    base_start = start or find_starting_weights(cfg)
    if base_start.model_dir is not None:
        return cfg, start
    base_cfg = cfg.replace(out=f"{cfg.run_dir}_base", lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, lora_targets=[],
                           lora_init="")
    print(_("[minigpt] debug: --lora-rank has no trained weights to adapt ({source}): one full-weight step into "
            "{path} first, then the walk adapts its final/").format(source=said_source(base_start.source),
                                                                     path=base_cfg.run_dir),
          flush=True)
    trainer = Trainer(base_cfg, start=base_start)
    try:
        trainer.objective.setup(trainer.setup_context())
        trainer.train_step()
        trainer.step = 1
        final = trainer.consolidate()
    finally:
        trainer.release_run_dir()
    return cfg.replace(init_from=str(final)), None


def walk(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Build the real Trainer, show its first batch, take one optimizer step and generate."""
    from minigpt.train.loop import Trainer

    cfg, start = debug_start(cfg, args.prompt)
    cfg, start = lora_base(cfg, start)
    trainer = Trainer(cfg, start=start)
    try:
        return _walk(trainer, cfg, args)
    finally:
        trainer.release_run_dir()  # the walk never calls run(), which would; the next walk may use the directory


def _walk(trainer: Trainer, cfg: TrainConfig, args: argparse.Namespace) -> int:
    import torch

    from minigpt.checkpoint import rng_state, set_rng_state
    from minigpt.data.datasets import IGNORE_INDEX

    say = print if trainer.engine.is_main else (lambda *a, **k: None)
    say(_("== config snapshot =="))
    say(json.dumps(json.loads((cfg.run_dir / "training_config_snapshot.json").read_text()), indent=2))
    random_state = rng_state()
    trainer.objective.setup(trainer.setup_context())  # e.g. DPO's reference, RLHF's reward: as run() does
    set_rng_state(random_state)
    batches = trainer.micro_batches()
    # A dict of tensors, or the objective's own micro-batch (RLHF's Rollout: sampled responses and rewards)
    first = {name: value for name, value in (batches[0] if isinstance(batches[0], dict) else vars(batches[0])).items()
             if isinstance(value, torch.Tensor)}
    ids_key = _first_ids_key(first)
    ids = _first_row(first, ids_key, args.show_tokens)
    say(_("== first batch =="))
    for name, tensor in first.items():
        say(f"{name:<20} shape={tuple(tensor.shape)} dtype={tensor.dtype}")
    say(_("raw text     {text!r}  ({key}[0])").format(text=trainer.tokenizer.render(ids), key=ids_key))
    say(_("token ids    {ids}").format(ids=ids))
    say(_("pieces       {pieces}").format(pieces=[trainer.tokenizer.id_to_piece(i) for i in ids]))
    labels_key = ids_key.replace("input_ids", "labels")
    if labels_key in first and labels_key != ids_key:
        mask = (first[labels_key][0, :args.show_tokens] != IGNORE_INDEX).int().tolist()
        say(_("loss mask    {mask}").format(mask=mask))
    before = ({name: tensor.clone() for name, tensor in trainer.engine.consolidated_state_dict().items()}
              if trainer.lora is not None else {})  # copies: the plain engine's state dict is the live weights
    loss, result, tokens, stats = trainer.train_step(batches)
    say(_("== one optimizer step =="))
    say(_("loss {loss:.4f}  grad-norm {grad_norm:.4f}  lr {lr:.2e}  tokens {tokens}").format(
        loss=loss, grad_norm=result.grad_norm, lr=result.lr, tokens=tokens))
    if stats.get("reward_std") == 0.0:
        say(_("note: every response of each prompt earned the same reward ({reward:.3f}), so GRPO's advantages, and "
              "with them the policy loss and gradient, are 0; a policy that sometimes answers right (start from an "
              "sft run) or --reward-model gives a non-zero loss").format(reward=stats["reward"]))
    if args.prompt:
        trainer.sample_prompt = args.prompt
        unseen = trainer.tokenizer.unseen_characters(args.prompt)
        if unseen:
            say(_("hint: the tokenizer {path} has not seen {unseen!r} (e.g. the demo tokenizer is English-only): they "
                  "go as bytes and the generation below looks garbled; train on text that has them (--data FILES "
                  "--retrain-tokenizer)").format(path=trainer.tokenizer.directory, unseen=unseen))
    text = trainer.sample()
    say(_("== generation =="))
    say(text)
    if trainer.lora is not None:
        trainer.step, trainer.tokens_seen = 1, tokens
        _report_lora(trainer, before, say)
    return 0


def _report_lora(trainer: Trainer, before: dict, say) -> None:
    """Which tensors the step changed (the adapters, and a head the mode adds; never a frozen weight), then
    `final/` as a LoRA run writes it: the merged weights, and the adapter alone in `final/adapter/`."""
    import torch

    from minigpt.lora import ADAPTER_DIR

    after = trainer.engine.consolidated_state_dict()
    final = trainer.consolidate()
    trainable = {name for name, param in trainer.engine.module.named_parameters() if param.requires_grad}
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    frozen = set(after) - trainable
    say(_("== LoRA =="))
    say(_("trainable tensors changed by the step: {changed} of {trainable} ({adapters} adapter tensors)").format(
        changed=len(changed & trainable), trainable=len(trainable),
        adapters=sum(".lora_" in name for name in trainable)))
    say(_("frozen tensors changed by the step: {changed} of {frozen}").format(changed=len(changed & frozen),
                                                                             frozen=len(frozen)))
    say(_("final        {path}: the merged weights (W + B·A·alpha/rank); the adapter alone in {adapter}").format(
        path=final, adapter=final / ADAPTER_DIR))


if __name__ == "__main__":
    sys.exit(main())
