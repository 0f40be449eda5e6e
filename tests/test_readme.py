"""The README cannot silently rot: its quick start runs as written and its CLI table matches the code."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from minigpt.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def quickstart_command(name: str) -> str:
    match = re.search(rf"<!-- quickstart:{name} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert match, f"README.md has no quickstart:{name} block"
    return match.group(1).strip()


def test_cli_reference_lists_every_train_flag_with_its_default():
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| .*? \| `(.*?)` \|$", README, re.M))
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert flag in rows, f"README CLI reference lacks {flag}"
        assert rows[flag] == repr(default), f"README says {flag} defaults to {rows[flag]}, code says {default!r}"


def test_test_command_is_what_ci_runs():
    assert "pytest --integration" in quickstart_command("tests")
    assert "quickstart:tests" in (REPO / ".ci" / "run").read_text()


@pytest.mark.integration
def test_quick_start_main_job_runs_end_to_end(tmp_path):
    """The quick start as written (its install step excepted: this environment is installed already)."""
    command = quickstart_command("main")
    install, _, job = command.partition(" && ")
    assert install.startswith("pip install")
    # Run in a scratch directory so the user's own checkpoints/ and data/ are never touched.
    for name in ("launch", "minigpt"):
        (tmp_path / name).symlink_to(REPO / name)
    result = subprocess.run(job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "checkpoints" / "pretrain_tiny"
    for produced in ("tokenizer/tokenizer.model", "final/model.pt", "final/config.json", "metrics.jsonl",
                     "training_config_snapshot.json", "dataset_stats.json", "latest"):
        assert (run_dir / produced).exists(), produced
    # The generator prints the prompt and its continuation after training's last line.
    generated = result.stdout.rsplit("consolidated weights in", 1)[-1]
    assert "The module" in generated, generated[-2000:]
    continuation = generated.split("The module", 1)[1]
    assert len(continuation.strip()) > 20, generated[-2000:]
