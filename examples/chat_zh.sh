#!/usr/bin/env bash
# The Chinese chat path of README.zh-CN.md, timed: pretrain on the built-in Chinese corpus (the quick start)
#   -> SFT on the built-in bilingual tasks -> a held-out Chinese test set disjoint from the training tasks
#   -> exact match with launch/eval.py -> a few answers through launch/chat.py. Numbers land in
#   docs/performance.md ("The Chinese chat recipe").
# Usage: examples/chat_zh.sh [WORKDIR]   (default: ./chat_zh_run; ~12 min on 2 quiet CPU cores: 713 s measured)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-chat_zh_run}"
mkdir -p "$WORK" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
python "$REPO/launch/train.py" --mode pretrain --config tiny --data demo:zh --vocab-size 8000 --max-steps 300 \
  --eval-interval 100 --out checkpoints/pretrain_tiny_zh
pretrained=$(date +%s)
python "$REPO/launch/train.py" --mode sft --config tiny --init-from checkpoints/pretrain_tiny_zh --seq-len 48 \
  --batch-size 32 --learning-rate 5e-3 --warmup-steps 100 --max-steps 8000 --precision fp32 \
  --out checkpoints/sft_tiny_zh
tuned=$(date +%s)
python "$REPO/data_tools/make_tasks.py" --out data/heldout_zh --count 300 --seed 987 --language zh \
  --exclude-from data/cache/demo/sft-20000.jsonl
python "$REPO/launch/eval.py" --model checkpoints/sft_tiny_zh --task tasks:data/heldout_zh/rlhf.jsonl \
  --exclude-from data/cache/demo/sft-20000.jsonl --out results_zh.json
finished=$(date +%s)
printf '计算 27+45\n/reset\n倒序写出 abcde\n/reset\n按字母排序 hdbfa\n/reset\n你好\n/reset\n你是谁？\n' \
  | python "$REPO/launch/chat.py" --model checkpoints/sft_tiny_zh/final --greedy
echo "pretrain $((pretrained - started)) s, sft $((tuned - pretrained)) s, held-out set and eval $((finished - tuned)) s:" \
  "$((finished - started)) s in all"
