"""Serve a consolidated MiniGPT model: an OpenAI-compatible API and a web chat (see minigpt/cli/serve.py).

    python launch/serve.py --model checkpoints/sft_tiny/final --port 8000

Exit codes: 0 stopped with Ctrl-C, 2 bad usage, a model directory that cannot be loaded or a port in use.
"""

import os
import sys

# `python launch/serve.py` works from a checkout without installing the project; the code is minigpt.cli.serve.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
