#!/usr/bin/env bash
# The whole post-training chain on the synthetic verifiable tasks, longer than the CI proofs:
#   tokenizer -> pretrain -> sft -> dpo -> reward model -> rlhf (GRPO, rule reward), then exact-match
#   accuracy of each stage's weights on held-out task prompts disjoint from the training tasks
#   (launch/eval.py). Numbers land in docs/training.md.
# Usage: examples/post_training.sh [WORKDIR]   (default: ./post_training_run; ~14 min on 2 quiet CPU cores)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-post_training_run}"
mkdir -p "$WORK/results" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
TRAIN=(python "$REPO/launch/train.py" --config tiny --seq-len 32 --data-dir data --log-interval 100)

# shellcheck source=examples/task_setup.sh
source "$REPO/examples/task_setup.sh"
write_task_data 20000

"${TRAIN[@]}" --mode pretrain --tokenizer tokenizer --data demo.txt --out runs/pretrain \
  --batch-size 16 --max-steps 200 --warmup-steps 20 --learning-rate 3e-3 --eval-interval 0
"${TRAIN[@]}" --mode sft --init-from runs/pretrain --data tasks/sft.jsonl --out runs/sft \
  --batch-size 32 --max-steps 4000 --warmup-steps 100 --learning-rate 5e-3 --eval-interval 1000
"${TRAIN[@]}" --mode dpo --init-from runs/sft --data tasks/dpo.jsonl --out runs/dpo \
  --batch-size 16 --max-steps 300 --warmup-steps 10 --learning-rate 1e-3 --dpo-sft-coef 1.0 --eval-interval 100 --eval-batches 20
"${TRAIN[@]}" --mode reward --init-from runs/sft --data tasks/dpo.jsonl --out runs/reward \
  --batch-size 16 --max-steps 300 --warmup-steps 10 --learning-rate 1e-3 --eval-interval 100 --eval-batches 20
"${TRAIN[@]}" --mode rlhf --init-from runs/sft --data tasks/rlhf.jsonl --out runs/rlhf \
  --batch-size 16 --rl-group-size 8 --rl-max-new-tokens 6 --max-steps 600 --warmup-steps 3 \
  --learning-rate 1e-3 --kl-coef 0.05 --rl-scale-rewards batch --eval-interval 150 --eval-batches 8
"${TRAIN[@]}" --mode rlhf --init-from runs/sft --data tasks/rlhf.jsonl --out runs/rlhf_rm \
  --reward-model runs/reward/final --batch-size 8 --rl-group-size 8 --rl-max-new-tokens 6 --max-steps 200 \
  --warmup-steps 3 --learning-rate 5e-4 --kl-coef 0.2 --eval-interval 0 --eval-batches 8

# Held out means disjoint: 300 prompts none of which is in the training files (make_tasks --exclude-from),
# scored greedily in the chat template by launch/eval.py, which also leaves out (and counts) any prompt
# of the training files it is given; the count must be 0 here.
python "$REPO/data_tools/make_tasks.py" --out heldout --count 300 --seed 987 --tasks sort,reverse \
  --exclude-from tasks/sft.jsonl
for stage in pretrain sft dpo rlhf rlhf_rm; do
  python "$REPO/launch/eval.py" --model "runs/$stage" --task tasks:heldout/rlhf.jsonl,max_new_tokens=8,name=heldout \
    --exclude-from tasks/sft.jsonl --exclude-from tasks/dpo.jsonl --exclude-from tasks/rlhf.jsonl \
    --out "results/$stage.json" --no-progress > "results/$stage.txt"
done

python - <<'EOF'
import json

for stage in ("pretrain", "sft", "dpo", "rlhf", "rlhf_rm"):
    m = json.load(open(f"results/{stage}.json"))["tasks"]["heldout"]["metrics"]
    print(f"{stage:9s} held-out greedy ({m['items']} prompts, {m['excluded']} seen in training left out): "
          f"exact match {m['exact_match']:.3f}, mean task reward {m['reward']:.3f}")

for run in ("rlhf", "rlhf_rm"):
    rows = [json.loads(line) for line in open(f"runs/{run}/metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    tenth = max(1, len(train) // 10)
    curve = [sum(r["reward"] for r in train[i:i + tenth]) / len(train[i:i + tenth]) for i in range(0, len(train), tenth)]
    print(f"{run} mean sampled reward per tenth of the run:", " ".join(f"{v:.3f}" for v in curve))
    print(f"{run} KL per token: max {max(r['kl'] for r in train):.3f}, last tenth "
          f"{sum(r['kl'] for r in train[-tenth:]) / tenth:.3f}")
EOF
