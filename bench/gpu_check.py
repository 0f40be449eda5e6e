"""GPU readiness in one table: what a CUDA machine runs of MiniGPT, and how fast (run by bench/gpu_check.sh).

    python bench/gpu_check.py                  # every check, ~3-6 minutes on one GPU
    python bench/gpu_check.py --preset tiny    # smaller model, for a quick look

Checks, each a row (pass / FAIL / skip with the reason):
  plain bf16        the plain engine trains the preset in bf16 autocast: loss falls, tokens/s, MFU
  plain fp16        the same in fp16 with loss scaling: loss falls, the GradScaler's scale after the run
  deepspeed zero2   `deepspeed --num_gpus 1 launch/train.py` with ds_configs/zero2.json in bf16: exit 0, tokens/s
  sdpa flash        scaled_dot_product_attention restricted to the flash kernel runs the model's attention
  sdpa efficient    the same with the memory-efficient kernel
  decode            KV-cache decode tokens/s at batch 1 and 8 (bench/decode.py's method)
Numbers are measured on the machine it runs on; nothing here is a claim about a GPU it did not run on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minigpt.config import TrainConfig, get_config  # noqa: E402
from minigpt.engine.plain import PlainEngine  # noqa: E402
from minigpt.flops import model_flops_utilization, peak_flops  # noqa: E402
from minigpt.generate import GenerationConfig, TextGenerator  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(name: str, status: str, detail: str) -> None:
    ROWS.append((name, status, detail))
    print(f"  {name:<18} {status:<5} {detail}", flush=True)


def train_plain(preset: str, precision: str, steps: int, seq_len: int, batch: int) -> None:
    torch.manual_seed(0)
    config = get_config(preset)
    cfg = TrainConfig.of(precision=precision, batch_size=batch, max_steps=steps, warmup_steps=5, learning_rate=1e-3)
    engine = PlainEngine(MiniGPT(config), cfg, torch.device("cuda"))
    data = torch.randint(0, config.vocab_size, (8, batch, seq_len + 1), device="cuda")
    losses, started = [], None
    for step in range(steps):
        if step == 5:  # warm-up steps (allocation, kernel selection) are not timed
            torch.cuda.synchronize()
            started = time.perf_counter()
        rows = data[step % len(data)]
        logits = engine(rows[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = (steps - 5) * batch * seq_len / seconds
    peak, _ = peak_flops(torch.device("cuda"), precision)
    mfu = model_flops_utilization(tokens_per_s * config.flops_per_token(seq_len), peak)
    learned = losses[-1] < losses[0] - 0.5
    extra = f", loss scale {engine.scaler.get_scale():.0f}" if precision == "fp16" else ""
    row(f"plain {precision}", "pass" if learned else "FAIL",
        f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, loss {losses[0]:.2f} -> {losses[-1]:.2f}{extra}")


def deepspeed_zero2(preset: str, steps: int, seq_len: int, batch: int) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        row("deepspeed zero2", "skip", "deepspeed is not installed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = ["deepspeed", "--num_gpus", "1", str(REPO / "launch" / "train.py"), "--mode", "pretrain",
               "--config", preset, "--max-steps", str(steps), "--precision", "bf16", "--seq-len", str(seq_len),
               "--batch-size", str(batch), "--eval-interval", "0", "--eval-batches", "2",
               "--ds-config", str(REPO / "ds_configs" / "zero2.json"), "--out", str(out)]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            row("deepspeed zero2", "FAIL", f"exit {done.returncode}: {(done.stderr or done.stdout)[-300:]!r}")
            return
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("split") == "train"]
        rate = sum(r.get("tokens_per_sec", 0) for r in train[-10:]) / max(1, len(train[-10:]))
        row("deepspeed zero2", "pass", f"bf16, {len(train)} steps, ~{rate:,.0f} tokens/s at the end, "
            f"{seconds:.0f} s with start-up and data preparation")


def sdpa_kernels(preset: str, seq_len: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = MiniGPT(get_config(preset)).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), device="cuda")
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([backend]):
                model(ids)
            row(f"sdpa {name}", "pass", f"the model's attention ran on the {name} kernel only (bf16, causal)")
        except RuntimeError as err:
            row(f"sdpa {name}", "FAIL", str(err).splitlines()[0][:200])


def decode(preset: str) -> None:
    torch.manual_seed(0)
    model = MiniGPT(get_config(preset))
    generator = TextGenerator(model, tokenizer=None, device="cuda")
    config = GenerationConfig(max_new_tokens=256, do_sample=False, stop_token_ids=())
    for batch in (1, 8):
        prompts = [torch.randint(4, model.config.vocab_size, (8,)).tolist() for _ in range(batch)]
        generator.generate_ids(prompts, GenerationConfig(max_new_tokens=4, do_sample=False, stop_token_ids=()))
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = generator.generate_ids(prompts, config)
        torch.cuda.synchronize()
        rate = sum(len(o) for o in outputs) / (time.perf_counter() - started)
        row(f"decode batch {batch}", "pass", f"{rate:,.0f} tokens/s (KV cache, greedy, 256 new tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device is visible; this check is for GPU machines", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"preset {args.preset}, seq {args.seq_len}, batch {args.batch_size}", flush=True)
    for precision in ("bf16", "fp16"):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            row("plain bf16", "skip", "this GPU does not support bf16")
            continue
        train_plain(args.preset, precision, args.steps, args.seq_len, args.batch_size)
    deepspeed_zero2(args.preset, args.steps, args.seq_len, args.batch_size)
    sdpa_kernels(args.preset, args.seq_len)
    decode(args.preset)
    print(f"\n{'check':<18} {'':<5} detail")
    for name, status, detail in ROWS:
        print(f"{name:<18} {status:<5} {detail}")
    return 1 if any(status == "FAIL" for _, status, _ in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
