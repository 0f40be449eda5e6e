"""Decode speed with and without the KV cache: tokens/s for N new tokens, greedy, batch 1.

    python bench/decode.py                      # small preset, 256 new tokens, CPU
    python bench/decode.py --preset tiny --device cuda --new-tokens 512

Random weights (speed does not depend on them); EOS is disabled so every run decodes exactly N tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from minigpt.config import get_config  # noqa: E402
from minigpt.generate import GenerationConfig, TextGenerator  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402


def time_decode(generator: TextGenerator, prompt: list[int], config: GenerationConfig, use_cache: bool,
                repeats: int) -> tuple[float, int]:
    """Best wall time over `repeats` runs (after one warm-up) and the tokens each run produced."""
    generator.generate_ids([prompt], GenerationConfig(max_new_tokens=4, do_sample=False, stop_token_ids=()),
                           use_cache=use_cache)
    best, produced = float("inf"), 0
    for _ in range(repeats):
        if generator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (ids,) = generator.generate_ids([prompt], config, use_cache=use_cache)
        if generator.device.type == "cuda":
            torch.cuda.synchronize()
        best, produced = min(best, time.perf_counter() - start), len(ids)
    return best, produced


def batched_rate(generator: TextGenerator, vocab: int, batch: int, prompt_tokens: int, new_tokens: int,
                 repeats: int = 1) -> float:
    """Generated tokens per second (all rows) of cached greedy decoding of `batch` random prompts at once."""
    prompts = torch.randint(4, vocab, (batch, prompt_tokens)).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=())
    generator.generate_ids(prompts, GenerationConfig(max_new_tokens=4, do_sample=False, stop_token_ids=()))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generator.generate_ids(prompts, config)
        best = min(best, time.perf_counter() - start)
    return sum(len(ids) for ids in out) / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode (best is reported)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32],
                        help="batch sizes of the batched (cached) decoding table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_config = get_config(args.preset)
    generator = TextGenerator(MiniGPT(model_config), tokenizer=None, device=args.device)
    prompt = torch.randint(4, model_config.vocab_size, (args.prompt_tokens,)).tolist()
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, stop_token_ids=())
    print(f"preset={args.preset} params={model_config.num_params():,} device={args.device} "
          f"threads={torch.get_num_threads()} prompt={args.prompt_tokens} new_tokens={args.new_tokens} "
          f"greedy torch={torch.__version__}")
    rows = []
    for label, use_cache in (("with KV cache", True), ("without cache", False)):
        seconds, produced = time_decode(generator, prompt, config, use_cache, args.repeats)
        rows.append((label, produced, seconds, produced / seconds))
    print(f"{'mode (batch 1)':<15} {'tokens':>6} {'seconds':>8} {'tokens/s':>9}")
    for label, produced, seconds, rate in rows:
        print(f"{label:<15} {produced:>6} {seconds:>8.2f} {rate:>9.1f}")
    print(f"KV cache speed-up: {rows[0][3] / rows[1][3]:.2f}x")
    if args.batches:
        print(f"{'batch':>5} {'tokens/s (all rows)':>20} {'per row':>8}")
        for batch in args.batches:
            rate = batched_rate(generator, model_config.vocab_size, batch, args.prompt_tokens, args.new_tokens,
                                args.repeats)
            print(f"{batch:>5} {rate:>20.1f} {rate / batch:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
