"""Generate text from a consolidated MiniGPT directory (model.pt + config.json + tokenizer files).

    python launch/generate.py --model checkpoints/pretrain_tiny/final --prompt "The king"
    python launch/generate.py --model checkpoints/pretrain_tiny --prompt "The king"   # a run directory: its final/
    python launch/generate.py --model DIR --chat --prompt "Who are you?" --stream

Exit codes: 0 done, 2 bad usage or a model directory that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.args import FlagParser
from minigpt.config import ConfigError
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _, docs_page
from minigpt.tokenizer import TokenizerError
from minigpt.weights import WeightsError

LOAD_ERRORS = (ConfigError, WeightsError, TokenizerError)
"""What loading `--model` raises for a user's mistake (a wrong path, a damaged or foreign directory)."""


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The sampling and device flags shared by generate, chat and serve (one definition, one help text)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    parser.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: cuda if available)")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The `GenerationConfig` of the flags `add_sampling_arguments` defined (ConfigError naming a bad field)."""
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            do_sample=not args.greedy, stop_strings=tuple(args.stop), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/generate.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="consolidated model directory (or a run directory: its final/), or a Hugging Face "
                             f"Llama directory ({docs_page('export.md')})")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the flag for several prompts (generated as one batch)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user turn of the chat template and answer it")
    add_sampling_arguments(parser)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    return parser


def resolve_device(requested: str) -> str:
    """`--device` checked against this machine (ConfigError naming it), or cuda when available, else cpu."""
    import torch

    from minigpt.engine.device import check_device

    if requested:
        return str(check_device(requested))
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_generator(args: argparse.Namespace) -> tuple[TextGenerator, GenerationConfig]:
    """The generator over `--model` on `--device` and the flags' sampling config; ConfigError,
    WeightsError or TokenizerError (also for a model without tokenizer files) naming what is wrong."""
    config = generation_config(args)
    generator = TextGenerator.from_dir(args.model, device=resolve_device(args.device))
    if generator.tokenizer is None:
        raise TokenizerError(_("{model} has no tokenizer files; text generation needs them").format(model=args.model))
    return generator, config


def load_generator_or_report(args: argparse.Namespace) -> tuple[TextGenerator, GenerationConfig] | None:
    """`load_generator`, with a model that cannot be loaded reported as one `error:` line on stderr
    (then None: the CLI exits with 2). Shared by generate, chat and serve."""
    try:
        return load_generator(args)
    except LOAD_ERRORS as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_generator_or_report(args)
    if loaded is None:
        return 2
    generator, config = loaded
    try:
        if args.stream:
            for index, prompt in enumerate(args.prompt):
                if index:
                    print("\n" + "-" * 40)
                print(prompt if not args.chat else f"[user] {prompt}\n[assistant] ", end="", flush=True)
                for piece in generator.stream(prompt, config, chat=args.chat):
                    print(piece, end="", flush=True)
                print()
        else:
            outputs = generator.generate(args.prompt, config, chat=args.chat)
            for index, (prompt, output) in enumerate(zip(args.prompt, outputs, strict=True)):
                if index:
                    print("-" * 40)
                print(f"[user] {prompt}\n[assistant] {output}" if args.chat else prompt + output)
    except ValueError as err:  # e.g. a prompt longer than the model's max_seq_len
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
