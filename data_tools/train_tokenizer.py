"""Train a MiniGPT tokenizer (byte-fallback BPE + special tokens + chat template) on text corpora.

    python data_tools/train_tokenizer.py --input data/corpus.txt --out tokenizer --vocab-size 4096
    python data_tools/train_tokenizer.py --input 'data/*.jsonl' --text-field content --out tok --vocab-size 8000
    python data_tools/train_tokenizer.py --demo --out tokenizer --vocab-size 4096

Exit codes: 0 done, 2 bad usage or unusable input (the message names the file).
"""

import os
import sys

# `python data_tools/train_tokenizer.py` works from a checkout without installing the project; the code is minigpt.cli.train_tokenizer.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
