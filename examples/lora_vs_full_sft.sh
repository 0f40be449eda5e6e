#!/usr/bin/env bash
# LoRA SFT against full SFT at the same steps, from the same pretrained weights, on the synthetic verifiable tasks:
#   tokenizer -> pretrain -> sft (every weight) and sft --lora-rank R (adapters only), then greedy exact match of
#   both on held-out prompts disjoint from the training tasks (launch/eval.py --exclude-from).
# The base is pretrained properly first (1,500 steps of 16 x 128 tokens of the demo corpus): the adapters leave the
# embeddings frozen, so a base that has not learnt its tokens gives them nothing to build on.
# Usage: examples/lora_vs_full_sft.sh [WORKDIR] [RANK] [LORA_LR]   (defaults: ./lora_vs_full_run, 16, 1.5e-3; a
# WORKDIR that has runs/pretrain/final or runs/sft/final keeps them). Numbers land in docs/training.md.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-lora_vs_full_run}"
RANK="${2:-16}"
LORA_LR="${3:-1.5e-3}"
mkdir -p "$WORK/results" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
TRAIN=(python "$REPO/launch/train.py" --config tiny --data-dir data --log-interval 100 --precision fp32)

# shellcheck source=examples/task_setup.sh
source "$REPO/examples/task_setup.sh"
write_task_data 3000

[ -f runs/pretrain/final/model.pt ] || "${TRAIN[@]}" --mode pretrain --tokenizer tokenizer --data demo.txt \
  --out runs/pretrain --seq-len 128 --batch-size 16 --max-steps 1500 --warmup-steps 50 --learning-rate 3e-3 \
  --eval-interval 500
SFT=(--mode sft --seq-len 32 --init-from runs/pretrain --data tasks/sft.jsonl --batch-size 32 --max-steps 1200
     --warmup-steps 50 --eval-interval 0)
[ -f runs/sft/final/model.pt ] || "${TRAIN[@]}" "${SFT[@]}" --out runs/sft --learning-rate 3e-3
start=$(date +%s)
"${TRAIN[@]}" "${SFT[@]}" --out "runs/lora_r$RANK" --learning-rate "$LORA_LR" --lora-rank "$RANK" --overwrite \
  > "results/lora_r$RANK.log" 2>&1
echo "lora rank $RANK: $(( $(date +%s) - start )) s"

python "$REPO/data_tools/make_tasks.py" --out heldout --count 300 --seed 987 --tasks sort,reverse \
  --exclude-from tasks/sft.jsonl
for stage in sft "lora_r$RANK"; do
  python "$REPO/launch/eval.py" --model "runs/$stage" --task tasks:heldout/rlhf.jsonl,max_new_tokens=8,name=heldout \
    --exclude-from tasks/sft.jsonl --out "results/$stage.json" --no-progress > "results/$stage.txt"
  python - "$stage" <<'PY'
import json, sys
stage = sys.argv[1]
m = json.load(open(f"results/{stage}.json"))["tasks"]["heldout"]["metrics"]
print(f"{stage:8s} held-out greedy ({m['items']} prompts): exact match {m['exact_match']:.3f}")
PY
done
grep -h "trainable parameters" "results/lora_r$RANK.log" | head -1
