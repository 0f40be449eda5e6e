"""Generate text from a consolidated MiniGPT directory (model.pt + config.json + tokenizer files).

    python launch/generate.py --model checkpoints/pretrain_tiny/final --prompt "The king"
    python launch/generate.py --model DIR --chat --prompt "Who are you?" --stream

Exit codes: 0 done, 2 bad usage or a model directory that cannot be loaded.
"""

import os
import sys

# `python launch/generate.py` works from a checkout without installing the project; the code is minigpt.cli.generate.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
