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
from minigpt.i18n import _
from minigpt.interop.common import ExportFormat, export_formats
from minigpt.tokenizer import TokenizerError
from minigpt.weights import WeightsError


def build_parser(formats: dict[str, ExportFormat] | None = None) -> argparse.ArgumentParser:
    """The flags; --format's choices and help come from the registered formats (`minigpt.interop.common`)."""
    formats = export_formats() if formats is None else formats
    outputs = list(dict.fromkeys(f.output for f in formats.values()))
    dtypes = list(dict.fromkeys(dtype for f in formats.values() for dtype in f.dtypes))
    parser = FlagParser(prog="launch/export.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory (uses its final/) or consolidated model directory")
    parser.add_argument("--format", required=True, choices=list(formats),
                        help="; ".join(f"{f.name}: {f.description}" for f in formats.values()))
    parser.add_argument("--out", required=True,
                        help="output " + " or ".join(
                            f"{output} ({', '.join(f.name for f in formats.values() if f.output == output)})"
                            for output in outputs))
    parser.add_argument("--dtype", default="fp32", choices=dtypes,
                        help="weight precision of the export (fp32 is exact; default: fp32)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    formats = export_formats()
    args = build_parser(formats).parse_args(argv)
    chosen = formats[args.format]
    if chosen.package:
        try:
            __import__(chosen.package)
        except ImportError:
            print(_("error: --format {format} needs the {package} package (pip install -e \".[{extra}]\")")
                  .format(format=chosen.name, package=chosen.package, extra=chosen.extra), file=sys.stderr)
            return 2
    try:
        out = chosen.export(args.model, args.out, dtype=args.dtype, force=args.force)
    except (ConfigError, WeightsError, TokenizerError) as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk: nothing is left at --out
        print(_("error: writing {out}: {err}").format(out=args.out, err=err), file=sys.stderr)
        return 2
    print(_("[minigpt] exported {model} as {format} ({dtype}) to {out}")
          .format(model=args.model, format=args.format, dtype=args.dtype, out=out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
