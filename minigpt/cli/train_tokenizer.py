"""Train a MiniGPT tokenizer (byte-fallback BPE + special tokens + chat template) on text corpora.

    python data_tools/train_tokenizer.py --input data/corpus.txt --out tokenizer --vocab-size 4096
    python data_tools/train_tokenizer.py --input 'data/*.jsonl' --text-field content --out tok --vocab-size 8000
    python data_tools/train_tokenizer.py --demo --out tokenizer --vocab-size 4096
    python data_tools/train_tokenizer.py --demo zh --out tokenizer_zh --vocab-size 4096

Exit codes: 0 done, 2 bad usage or unusable input (the message names the file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from minigpt.cli.args import FlagParser
from minigpt.data.demo import CORPORA, write_demo_corpus
from minigpt.data.sources import InputError
from minigpt.i18n import _, docs_page
from minigpt.tokenizer import TokenizerError
from minigpt.tokenizer_training import train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="data_tools/train_tokenizer.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[],
                        help=_(".txt / .jsonl / .jsonl.gz / .parquet file or glob; repeatable"))
    parser.add_argument("--demo", nargs="?", const="en", choices=sorted(CORPORA),
                        help=_("also train on a built-in demo corpus: en (the default: CPython's documentation) "
                               "or zh (classical Chinese poetry)"))
    parser.add_argument("--out", required=True, help=_("tokenizer directory to write (replaced if it is one)"))
    parser.add_argument("--vocab-size", type=int, required=True,
                        help=_("vocabulary size (at most; small corpora give less)"))
    parser.add_argument("--text-field", default="text", help=_("JSONL field or Parquet column holding the text"))
    parser.add_argument("--max-sentence-length", type=int, default=4096,
                        help=_("lines longer than this many characters are cut for training"))
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, help=_("most lines to train on"))
    return parser


def coverage_line(coverage: dict) -> str:
    """One line on how the vocabulary covers the corpus's characters, with advice when it is thin."""
    line = _("character coverage {coverage:.1%} of the training text; {fallback} of {distinct} distinct characters "
             "fall back to UTF-8 bytes").format(coverage=coverage["char_coverage"],
                                                fallback=coverage["byte_fallback_chars"],
                                                distinct=coverage["distinct_chars"])
    if coverage["byte_fallback_chars"]:
        line += _(" (most frequent: {examples})").format(examples=coverage["byte_fallback_examples"])
    if coverage["char_coverage"] < 0.98:
        line += _("; a larger --vocab-size covers more (see {docs}: choosing a vocabulary size)").format(
            docs=docs_page("data.md"))
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = list(args.input)
    if not inputs and not args.demo:
        print(_("error: give --input FILE (repeatable) or --demo"), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo:
            demo = os.path.join(scratch, CORPORA[args.demo])
            inputs.append(str(write_demo_corpus(demo, args.demo)))
        try:
            tokenizer = train_tokenizer(inputs, args.out, vocab_size=args.vocab_size, text_field=args.text_field,
                                        max_sentence_length=args.max_sentence_length,
                                        input_sentence_size=args.input_sentence_size)
        except (InputError, TokenizerError) as err:
            print(_("error: {error}").format(error=err), file=sys.stderr)
            return 2
    print(_("tokenizer with {vocab_size} tokens written to {path} (checksum {checksum})").format(
        vocab_size=tokenizer.vocab_size, path=args.out, checksum=tokenizer.checksum[:12]))
    print(coverage_line(tokenizer.meta["training"]["coverage"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
