"""Write small verifiable tasks (addition, reversal, sorting) as SFT, DPO and RLHF JSONL files.

    python data_tools/make_tasks.py --out data/tasks --count 2000 --seed 0
    # -> data/tasks/sft.jsonl, dpo.jsonl, rlhf.jsonl (the same tasks in each format)
    python data_tools/make_tasks.py --out data/heldout --count 300 --seed 987 --exclude-from data/tasks/sft.jsonl
    # -> a held-out set: no prompt of the training file, no prompt twice
    python data_tools/make_tasks.py --out data/heldout_zh --count 300 --seed 987 --language zh
    # -> the prompts in Chinese: 计算 27+45, 倒序写出 cabd, 按字母排序 dbca
"""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.args import FlagParser
from minigpt.data.tasks import LANGUAGES, TASKS, read_prompts, write_task_files
from minigpt.i18n import _


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="data_tools/make_tasks.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=_("directory for sft.jsonl, dpo.jsonl, rlhf.jsonl"))
    parser.add_argument("--count", type=int, default=2000, help=_("tasks per file"))
    parser.add_argument("--seed", type=int, default=0, help=_("seed (same seed, same tasks)"))
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=_("comma-separated subset of {tasks}").format(tasks=",".join(TASKS)))
    parser.add_argument("--language", default="en", choices=LANGUAGES,
                        help=_("how the prompts are phrased: en (Add 27+45) or zh (计算 27+45)"))
    parser.add_argument("--exclude-from", action="append", default=[], metavar="JSONL",
                        help=_("training task file(s) whose prompts the new set must not contain (any task format; "
                               "repeatable); the set then also holds each prompt once"))
    args = parser.parse_args(argv)
    try:
        exclude = read_prompts(args.exclude_from) if args.exclude_from else None
        paths = write_task_files(args.out, args.count, args.seed, tuple(args.tasks.split(",")), exclude,
                                 args.language)
    except ValueError as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    written = ", ".join(str(p) for p in paths.values())
    if exclude:
        print(_("wrote {paths} (disjoint from the {count:,} prompts of {sources})").format(
            paths=written, count=len(exclude), sources=", ".join(args.exclude_from)))
    else:
        print(_("wrote {paths}").format(paths=written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
