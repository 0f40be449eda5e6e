"""Evaluate consolidated weights: bits per byte, multiple choice, verifiable tasks (see minigpt/cli/eval.py).

    python launch/eval.py --model checkpoints/pretrain_tiny/final --task bpb:data/val.txt
    deepspeed --num_gpus 2 launch/eval.py --model DIR --task tasks:heldout/rlhf.jsonl

Exit codes: 0 done, 2 bad usage or unusable input.
"""

import os
import sys

# `python launch/eval.py` works from a checkout without installing the project; the code is minigpt.cli.eval.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
