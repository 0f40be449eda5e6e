"""Walk the whole stack once, loudly: config snapshot, first batch, one optimizer step, generation.

    python launch/debug_fullstack.py --mode pretrain --model-size tiny --prompt "The"

Uses the real Trainer (same data resolution, engine, objective and loop step as training), so what it
prints is what training sees. Any TrainConfig flag is accepted too (e.g. --data, --out).
"""

import os
import sys

# `python launch/debug_fullstack.py` works from a checkout without installing the project; the code is minigpt.cli.debug_fullstack.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.debug_fullstack import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
