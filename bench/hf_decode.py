"""Decode speed of our generator against transformers' generate() on the same exported weights.

    python bench/hf_decode.py                              # random small preset, 128 new tokens, CPU
    python bench/hf_decode.py --model checkpoints/sft_tiny --device cuda --new-tokens 256

The model is exported with `minigpt-export --format hf` (fp32) and loaded by transformers; both decode
the same prompt greedily, batch 1, with a KV cache and stop tokens disabled, so each produces exactly N
tokens. Best of --repeats timed runs after a warm-up; the ratio is ours / transformers (goal >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from minigpt.config import get_config  # noqa: E402
from minigpt.data.demo import write_demo_corpus  # noqa: E402
from minigpt.generate import GenerationConfig, TextGenerator  # noqa: E402
from minigpt.interop.hf_llama import export_hf  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.tokenizer_training import train_tokenizer  # noqa: E402
from minigpt.weights import save_consolidated  # noqa: E402


def best_time(run, repeats: int, device: torch.device) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def random_model_dir(preset: str, work: Path) -> Path:
    """A random-weight model of `preset` with a small demo-corpus tokenizer (speed does not depend on either)."""
    tokenizer = train_tokenizer([write_demo_corpus(work / "corpus.txt")], work / "tokenizer", vocab_size=1000)
    torch.manual_seed(0)
    model = MiniGPT(get_config(preset))
    return save_consolidated(work / "model", model.state_dict(), model.config, tokenizer.directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="run or consolidated directory (default: random --preset)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import transformers

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(args.model) if args.model else random_model_dir(args.preset, Path(work))
        hf_dir = export_hf(model_dir, Path(work) / "hf")
        ours = TextGenerator.from_dir(hf_dir, device=device)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    theirs.generation_config.eos_token_id = None  # exactly N tokens, like ours with no stop ids
    prompt = ours.tokenizer.encode("First Citizen: Before we proceed any further, hear me speak.")
    n = min(args.new_tokens, ours.model.config.max_seq_len - len(prompt))
    config = GenerationConfig(max_new_tokens=n, do_sample=False, stop_token_ids=())
    ids = torch.tensor([prompt], device=device)

    def run_theirs():
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == n

    ours_s = best_time(lambda: ours.generate_ids([prompt], config), args.repeats, device)
    theirs_s = best_time(run_theirs, args.repeats, device)
    config_text = f"{ours.model.config.num_params():,} params, {n} new tokens, batch 1, greedy, {args.device}"
    print(f"hf_decode: {config_text}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"  minigpt      {n / ours_s:10.1f} tok/s")
    print(f"  transformers {n / theirs_s:10.1f} tok/s")
    print(f"  ratio        {theirs_s / ours_s:10.2f}x (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
