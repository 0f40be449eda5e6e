"""Write small verifiable tasks (addition, reversal, sorting) as SFT, DPO and RLHF JSONL files.

    python data_tools/make_tasks.py --out data/tasks --count 2000 --seed 0
    # -> data/tasks/sft.jsonl, dpo.jsonl, rlhf.jsonl (the same tasks in each format)
"""

from __future__ import annotations

import argparse
import sys

from minigpt.data.tasks import TASKS, write_task_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data_tools/make_tasks.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for sft.jsonl, dpo.jsonl, rlhf.jsonl")
    parser.add_argument("--count", type=int, default=2000, help="tasks per file")
    parser.add_argument("--seed", type=int, default=0, help="seed (same seed, same tasks)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    args = parser.parse_args(argv)
    try:
        paths = write_task_files(args.out, args.count, args.seed, tuple(args.tasks.split(",")))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
