"""Export a MiniGPT model to the Hugging Face Llama format or GGUF.

    python launch/export.py --model checkpoints/sft_tiny --format hf --out exports/sft_tiny-hf
    python launch/export.py --model checkpoints/sft_tiny --format gguf --dtype bf16 --out sft_tiny.gguf

Exit codes: 0 done, 2 bad usage or a model that cannot be exported exactly.
"""

import os
import sys

# `python launch/export.py` works from a checkout without installing the project; the code is minigpt.cli.export.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
