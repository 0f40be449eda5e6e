"""Export a MiniGPT model to the Hugging Face format (transformers, vLLM) or to GGUF (llama.cpp, Ollama).

Dense models export as LlamaForCausalLM, mixtures of experts as GraniteMoeSharedForCausalLM (hf only).

    python launch/export.py --model checkpoints/sft_tiny --format hf --out exports/sft_tiny-hf
    python launch/export.py --model checkpoints/sft_tiny/final --format gguf --dtype bf16 --out sft_tiny.gguf

--model is a run directory (its final/ is used) or a consolidated model directory. The output appears
complete or not at all; an existing --out is refused unless --force. Needs the `hf` extra
(pip install -e ".[hf]": safetensors, gguf; transformers to load the result).
Exit codes: 0 done, 2 bad usage, a model that cannot be exported exactly, or a missing package.
"""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.args import FlagParser
from minigpt.config import ConfigError
from minigpt.tokenizer import TokenizerError
from minigpt.weights import WeightsError

FORMATS = ("hf", "gguf")
PACKAGES = {"hf": "safetensors", "gguf": "gguf"}


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/export.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory (uses its final/) or consolidated model directory")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf: a Hugging Face directory (Llama; GraniteMoeShared for mixtures of experts); "
                             "gguf: one llama.cpp GGUF file (dense models)")
    parser.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="weight precision of the export (fp32 is exact; default: fp32)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        __import__(PACKAGES[args.format])
    except ImportError:
        print(f"error: --format {args.format} needs the {PACKAGES[args.format]} package "
              f"(pip install -e \".[hf]\")", file=sys.stderr)
        return 2
    try:
        if args.format == "hf":
            from minigpt.interop.hf_llama import export_hf

            out = export_hf(args.model, args.out, dtype=args.dtype, force=args.force)
        else:
            from minigpt.interop.gguf_llama import export_gguf

            out = export_gguf(args.model, args.out, dtype=args.dtype, force=args.force)
    except (ConfigError, WeightsError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk: nothing is left at --out
        print(f"error: writing {args.out}: {err}", file=sys.stderr)
        return 2
    print(f"[minigpt] exported {args.model} as {args.format} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
