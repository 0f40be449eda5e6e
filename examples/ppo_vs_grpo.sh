#!/usr/bin/env bash
# PPO against GRPO at equal wall time, after the same SFT, on the synthetic verifiable tasks (rule reward):
#   tokenizer -> pretrain -> sft, then rlhf --rl-algo ppo and rlhf --rl-algo grpo side by side (run at the
#   same time, so both see the same machine load) with the same --max-time; then greedy exact match of
#   sft, ppo and grpo on held-out prompts disjoint from the training tasks (launch/eval.py --exclude-from).
# Usage: examples/ppo_vs_grpo.sh [WORKDIR] [BUDGET] [LR]   (defaults: ./ppo_vs_grpo_run, 12m, 3e-4; a WORKDIR that
# has runs/sft/final keeps it, so another budget or LR compares from the same SFT). Numbers land in docs/training.md.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-ppo_vs_grpo_run}"
BUDGET="${2:-12m}"
LR="${3:-3e-4}"
mkdir -p "$WORK/results" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
TRAIN=(python "$REPO/launch/train.py" --config tiny --seq-len 32 --data-dir data --log-interval 50 --precision fp32)

# shellcheck source=examples/task_setup.sh
source "$REPO/examples/task_setup.sh"
write_task_data 3000

[ -f runs/pretrain/final/model.pt ] || "${TRAIN[@]}" --mode pretrain --tokenizer tokenizer --data demo.txt \
  --out runs/pretrain --batch-size 16 --max-steps 40 --warmup-steps 5 --learning-rate 3e-3 --eval-interval 0
[ -f runs/sft/final/model.pt ] || "${TRAIN[@]}" --mode sft --init-from runs/pretrain --data tasks/sft.jsonl \
  --out runs/sft --batch-size 32 --max-steps 1200 --warmup-steps 50 --learning-rate 3e-3 --eval-interval 0

RL=(--init-from runs/sft --data tasks/rlhf.jsonl --rl-max-new-tokens 6 --warmup-steps 3 --learning-rate "$LR"
    --kl-coef 0.05 --max-time "$BUDGET" --max-steps 100000 --eval-interval 0 --eval-batches 8)
nice "${TRAIN[@]}" --mode rlhf --rl-algo ppo --out runs/ppo "${RL[@]}" --batch-size 32 --rl-group-size 2 \
  > results/ppo.log 2>&1 &
ppo=$!
# GRPO starts once PPO has built the prompts' shard cache (two builders of one cache: the second is refused).
until grep -q "rlhf: PPO" results/ppo.log; do kill -0 "$ppo" && sleep 1; done
nice "${TRAIN[@]}" --mode rlhf --rl-algo grpo --out runs/grpo "${RL[@]}" --batch-size 16 --rl-group-size 8 \
  --rl-scale-rewards batch > results/grpo.log 2>&1 &
grpo=$!
wait "$ppo" "$grpo"

python "$REPO/data_tools/make_tasks.py" --out heldout --count 300 --seed 987 --tasks sort,reverse \
  --exclude-from tasks/sft.jsonl
for stage in sft ppo grpo; do
  python "$REPO/launch/eval.py" --model "runs/$stage" --task tasks:heldout/rlhf.jsonl,max_new_tokens=8,name=heldout \
    --exclude-from tasks/sft.jsonl --exclude-from tasks/dpo.jsonl --exclude-from tasks/rlhf.jsonl \
    --out "results/$stage.json" --no-progress > "results/$stage.txt"
done

python - <<'EOF'
import json

for stage in ("sft", "ppo", "grpo"):
    m = json.load(open(f"results/{stage}.json"))["tasks"]["heldout"]["metrics"]
    print(f"{stage:5s} held-out greedy ({m['items']} prompts, {m['excluded']} seen in training left out): "
          f"exact match {m['exact_match']:.3f}, mean task reward {m['reward']:.3f}")
for run in ("ppo", "grpo"):
    rows = [json.loads(line) for line in open(f"runs/{run}/metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    bounds = [round(i * len(train) / 10) for i in range(11)]
    tenths = [train[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    curve = [sum(r["reward"] for r in part) / len(part) for part in tenths]
    print(f"{run}: {len(train)} steps; mean sampled reward per tenth of the run:", " ".join(f"{v:.3f}" for v in curve))
    print(f"{run}: KL per token max {max(r['kl'] for r in train):.3f}, last tenth "
          f"{sum(r['kl'] for r in tenths[-1]) / len(tenths[-1]):.3f}")
    val = [r for r in rows if r.get("split") == "val"]
    if val:
        print(f"{run}: val_exact {val[-1]['val_exact']:.3f}, val_reward {val[-1]['val_reward']:.3f}")
EOF
