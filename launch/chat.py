"""Chat with a consolidated MiniGPT model in the terminal (see minigpt/cli/chat.py).

    python launch/chat.py --model checkpoints/sft_tiny/final --system "You are a helpful assistant."
    printf 'Hello\n/reset\n你好\n' | python launch/chat.py --model DIR --greedy

Exit codes: 0 done, 2 bad usage or a model directory that cannot be loaded.
"""

import os
import sys

# `python launch/chat.py` works from a checkout without installing the project; the code is minigpt.cli.chat.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
