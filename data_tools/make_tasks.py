"""Write small verifiable tasks (addition, reversal, sorting) as SFT, DPO and RLHF JSONL files.

    python data_tools/make_tasks.py --out data/tasks --count 2000 --seed 0
    # -> data/tasks/sft.jsonl, dpo.jsonl, rlhf.jsonl (the same tasks in each format)
    python data_tools/make_tasks.py --out data/heldout --count 300 --seed 987 --exclude-from data/tasks/sft.jsonl
    # -> a held-out set: no prompt of the training file, no prompt twice
"""

import os
import sys

# `python data_tools/make_tasks.py` works from a checkout without installing the project; the code is minigpt.cli.make_tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.make_tasks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
