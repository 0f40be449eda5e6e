"""Train a MiniGPT model: `python launch/train.py ...` (one device) or `deepspeed launch/train.py ...`.

Every flag mirrors a field of `minigpt.config.TrainConfig`; `--help` lists them. Exit codes:
0 finished, 75 stopped by a signal after saving (rerun with --auto-resume), 130 aborted, 2 bad usage.
"""

import os
import sys

# `python launch/train.py` works from a checkout without installing the project; the code is minigpt.cli.train.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
