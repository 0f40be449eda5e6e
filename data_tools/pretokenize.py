"""Pre-tokenize raw files into a MiniGPT dataset directory (train/ and val/ shards + dataset_stats.json).

    python data_tools/pretokenize.py --input data/corpus.txt --tokenizer tokenizer --out shards/corpus
    python data_tools/pretokenize.py --input 'chats/*.jsonl.gz' --tokenizer tok --out shards/chat --kind sft
    python data_tools/pretokenize.py --input prefs.jsonl --tokenizer tok --out shards/dpo --kind dpo --strict
    python data_tools/pretokenize.py --input 'web/*.parquet' --tokenizer tok --out shards/web --dedup --min-chars 200

Bad records are skipped and reported per file (see dataset_stats.json); --strict fails on the first.
Exit codes: 0 done, 2 bad usage or unusable input (the message names the file and line).
"""

import os
import sys

# `python data_tools/pretokenize.py` works from a checkout without installing the project; the code is minigpt.cli.pretokenize.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.cli.pretokenize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
