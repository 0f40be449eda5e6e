"""PPO under the real `deepspeed` launcher, 2 CPU ranks over gloo: ZeRO-2 trains, checkpoints the critic with the
policy and resumes bitwise, writes a final/ without it; ZeRO-3 is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from ports import free_port

from minigpt.config import PRESETS
from minigpt.data.tasks import write_task_files
from minigpt.model import MiniGPT
from minigpt.weights import load_consolidated, save_consolidated

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parents[1]
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)

if shutil.which("deepspeed") is None:
    pytest.skip("the deepspeed launcher is not on PATH", allow_module_level=True)


@pytest.fixture
def workdir(tmp_path, data_tokenizer) -> Path:
    """Prompts of the sort task and a 2-layer model standing in for an SFT run's final/."""
    write_task_files(tmp_path / "tasks", 48, seed=0, tasks=("sort",))
    torch.manual_seed(0)
    model = MiniGPT(dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size))
    save_consolidated(tmp_path / "sft" / "final", model.state_dict(), model.config, data_tokenizer.directory,
                      extra={"mode": "sft"})
    return tmp_path


def launch(workdir: Path, zero: int, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
           "--mode", "rlhf", "--rl-algo", "ppo", "--init-from", "sft", "--data", "tasks/rlhf.jsonl",
           "--data-dir", "data", "--seq-len", "48", "--batch-size", "2", "--rl-group-size", "2",
           "--rl-max-new-tokens", "4", "--max-steps", "4", "--warmup-steps", "1", "--learning-rate", "3e-3",
           "--eval-interval", "0", "--eval-batches", "1", "--log-interval", "100", "--sample-prompt", "a",
           "--precision", "fp32", "--prefetch", "0", "--ds-config", str(REPO / "ds_configs" / f"zero{zero}.json"),
           "--out", out, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900, env=env)


def train_rows(run_dir: Path) -> list[dict]:
    rows = map(json.loads, filter(None, (run_dir / "metrics.jsonl").read_text().splitlines()))
    return [r for r in rows if r.get("split") == "train"]


def test_ppo_under_zero2_checkpoints_the_critic_and_resumes_bitwise(workdir):
    done = launch(workdir, 2, "whole", "--save-interval", "2")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "rlhf: PPO" in done.stdout
    whole = train_rows(workdir / "whole")
    assert [r["step"] for r in whole] == [0, 1, 2, 3] and all(r["value_loss"] > 0 for r in whole)
    resumed_run = launch(workdir, 2, "resumed", "--resume", str(workdir / "whole" / "ckpt" / "step_0000002"))
    assert resumed_run.returncode == 0, resumed_run.stdout[-4000:] + resumed_run.stderr[-4000:]
    resumed = train_rows(workdir / "resumed")
    assert [r["step"] for r in resumed] == [2, 3]
    for name in ("loss", "value_loss", "policy_loss", "kl"):
        assert [r[name] for r in resumed] == [r[name] for r in whole[2:]], name
    model, _tokenizer = load_consolidated(workdir / "whole" / "final")  # the language model alone
    assert not any("value_head" in key for key in model.state_dict())
    saved = torch.load(workdir / "whole" / "final" / "model.pt", weights_only=True)
    assert set(saved) == set(model.state_dict())


def test_ppo_under_zero3_is_refused_in_one_line(workdir):
    done = launch(workdir, 3, "zero3")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "--rl-algo ppo runs under DeepSpeed ZeRO stages 0-2" in output
    assert "Traceback" not in output
