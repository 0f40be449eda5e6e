"""Pre-tokenize raw files into a MiniGPT dataset directory (train/ and val/ shards + dataset_stats.json).

    python data_tools/pretokenize.py --input data/corpus.txt --tokenizer tokenizer --out shards/corpus
    python data_tools/pretokenize.py --input 'chats/*.jsonl.gz' --tokenizer tok --out shards/chat --kind sft
    python data_tools/pretokenize.py --input prefs.jsonl --tokenizer tok --out shards/dpo --kind dpo --strict
    python data_tools/pretokenize.py --input 'web/*.parquet' --tokenizer tok --out shards/web --dedup --min-chars 200

Bad records are skipped and reported per file (see dataset_stats.json); --strict fails on the first.
Memory does not grow with the input. An interrupted run (Ctrl-C, a kill) leaves .OUT.partial beside
--out: run the same command again and it continues where it stopped.
Exit codes: 0 done, 2 bad usage or unusable input (the message names the file and line).
"""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.args import FlagParser
from minigpt.config import DataSection
from minigpt.data.build import STATS_FILE, DatasetBuildError, build_dataset
from minigpt.data.cleaning import Cleaning
from minigpt.data.shards import KINDS
from minigpt.i18n import _, docs_page
from minigpt.tokenizer import Tokenizer, TokenizerError


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="data_tools/pretokenize.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True,
                        help=_(".txt / .jsonl / .jsonl.gz / .parquet file or glob; repeatable"))
    parser.add_argument("--tokenizer", required=True, help=_("tokenizer directory (data_tools/train_tokenizer.py)"))
    parser.add_argument("--out", required=True, help=_("dataset directory to write"))
    parser.add_argument("--kind", choices=KINDS, default="pretrain",
                        help=_("what the records are ({docs})").format(docs=docs_page("data.md")))
    parser.add_argument("--val-fraction", type=float, default=DataSection.val_fraction,
                        help=_("share of documents for validation (the same default as train.py's raw-file path)"))
    parser.add_argument("--seed", type=int, default=1337, help=_("seed of the train/validation split"))
    parser.add_argument("--workers", type=int, default=1,
                        help=_("encoding processes (an input under 64 MB is encoded in this process, on as many "
                               "threads)"))
    parser.add_argument("--text-field", default="text", help=_("JSONL field or Parquet column holding the text (pretrain)"))
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help=_("skip DPO/RLHF records whose prompt is longer (tokens)"))
    parser.add_argument("--dedup", action="store_true",
                        help=_("drop records whose normalised text an earlier record already had (off by default)"))
    parser.add_argument("--min-chars", type=int, default=0,
                        help=_("pretrain: drop documents shorter than this many characters (0: off)"))
    parser.add_argument("--max-repeated-lines", type=float, default=1.0, metavar="SHARE",
                        help=_("pretrain: drop documents whose share of lines repeating an earlier line is above "
                               "this (1: off)"))
    parser.add_argument("--strict", action="store_true",
                        help=_("fail on the first bad record instead of skipping"))
    parser.add_argument("--overwrite", action="store_true", help=_("replace an existing --out"))
    parser.add_argument("--quiet", action="store_true", help=_("no progress bar"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cleaning = Cleaning(args.dedup, args.min_chars, args.max_repeated_lines)
        tokenizer = Tokenizer(args.tokenizer)
        out = build_dataset(args.input, args.out, tokenizer, kind=args.kind, val_fraction=args.val_fraction,
                            seed=args.seed, workers=args.workers, text_field=args.text_field, strict=args.strict,
                            progress=not args.quiet, max_prompt_tokens=args.max_prompt_tokens,
                            overwrite=args.overwrite, cleaning=cleaning)
    except (DatasetBuildError, TokenizerError, ValueError) as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_("[minigpt] interrupted: run the same command again to continue where it stopped"), file=sys.stderr)
        return 130
    print(_("dataset written to {path} (statistics in {stats})").format(path=out, stats=out / STATS_FILE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
