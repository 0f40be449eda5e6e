#!/usr/bin/env bash
# GPU readiness check: run from the repository root on a machine with a CUDA GPU, as it is:
#     bash bench/gpu_check.sh
# Installs MiniGPT (with DeepSpeed) into the current Python if it is not importable yet, keeping the torch
# build already installed (install the one for your CUDA first), then prints one table of checks:
# plain engine bf16 and fp16 (loss scaling), DeepSpeed ZeRO-2 bf16 on one GPU, the flash / memory-efficient
# SDPA kernels, and KV-cache decode speed (bench/gpu_check.py). Budget: under 8 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA GPU is visible to torch (install the CUDA build of torch first)" >&2; exit 2; }
python -c "import minigpt, deepspeed" 2>/dev/null || pip install -q -e ".[deepspeed]"
exec timeout 480 python bench/gpu_check.py "$@"
