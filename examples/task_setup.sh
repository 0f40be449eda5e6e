# Sourced by the examples that train on the synthetic verifiable tasks (post_training.sh, ppo_vs_grpo.sh,
# lora_vs_full_sft.sh): `write_task_data COUNT` writes tasks/{sft,dpo,rlhf}.jsonl with COUNT sort/reverse tasks
# (seed 0), the English demo corpus as demo.txt, and a 384-token tokenizer trained on both (kept if present),
# in the working directory.
write_task_data() {
  python - "$1" <<'PY'
import sys
from pathlib import Path
from minigpt.data.demo import write_demo_corpus
from minigpt.data.tasks import write_task_files
from minigpt.tokenizer_training import train_tokenizer
write_task_files("tasks", int(sys.argv[1]), seed=0, tasks=("sort", "reverse"))
write_demo_corpus(Path("demo.txt"))
if not Path("tokenizer/tokenizer.json").exists():
    train_tokenizer(["tasks/sft.jsonl", "demo.txt"], "tokenizer", vocab_size=384)
PY
}
