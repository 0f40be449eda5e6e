"""slurm/submit.sh fills the sbatch command from flags; slurm/signal_ranks.py signals only a run's ranks."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "slurm" / "submit.sh"
_spec = importlib.util.spec_from_file_location("slurm_signal_ranks", ROOT / "slurm" / "signal_ranks.py")
signal_ranks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(signal_ranks)

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


def dry_run(*args: str) -> list[str]:
    result = subprocess.run(["bash", str(SUBMIT), "--dry-run", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("+ ")
    return line[2:].split()


@needs_bash
def test_cpu_submission_uses_one_srun_task_per_rank_and_the_single_node_script() -> None:
    words = dry_run("--cpu-ranks-per-node", "2", "--time", "5", "--", "--max-steps", "20")
    assert "--ntasks-per-node=2" in words and "--cpus-per-task=1" in words and "--time=5" in words
    assert "--signal=B:USR1@120" in words and "--requeue" in words and "--open-mode=append" in words
    assert "CPU_RANKS_PER_NODE=2" in words and "LAUNCHER=srun" in words
    script = words.index("slurm/train_single_node.sbatch")
    assert words[script + 1:] == ["--max-steps", "20"]


@needs_bash
def test_multi_node_deepspeed_submission_runs_one_launcher_per_node() -> None:
    words = dry_run("--nodes", "4", "--gpus-per-node", "8", "--launcher", "deepspeed", "--partition", "gpu",
                    "--account", "proj", "--mode", "sft", "--preset", "small", "--signal-lead", "300")
    assert "slurm/train_multi_node.sbatch" in words
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                     "--account=proj", "--signal=B:USR1@300", "MODE=sft", "PRESET=small",
                     "OUT=checkpoints/sft_small", "--output=checkpoints/sft_small/slurm-%j.out"):
        assert expected in words


@needs_bash
@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "pretrian"], "--mode must be pretrain, sft, dpo, reward or rlhf, got 'pretrian'"),
    (["--launcher", "mpirun"], "--launcher must be srun, deepspeed or python"),
    (["--nodes", "two"], "--nodes must be a non-negative integer, got 'two'"),
    (["--launcher", "python", "--cpu-ranks-per-node", "2"], "--launcher python runs one rank"),
    (["--max-steps", "5"], "unknown option '--max-steps' (training flags go after --"),
])
def test_bad_submit_flags_exit_2_naming_the_flag(args: list[str], message: str) -> None:
    result = subprocess.run(["bash", str(SUBMIT), *args, "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr


@needs_bash
@pytest.mark.parametrize("script", ["slurm/common.sh", "slurm/submit.sh", "slurm/train_single_node.sbatch",
                                    "slurm/train_multi_node.sbatch", ".ci/slurm-setup.sh",
                                    ".ci/slurm-two-node.sh"])
def test_shell_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_command_line_parsing_finds_the_script_and_run_directory() -> None:
    rank = ["/usr/bin/python3", "-u", "launch/train.py", "--local_rank=0", "--out", "runs/a"]
    launcher = ["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x",
                "launch/train.py", "--out", "runs/a"]
    assert signal_ranks.script_argument(rank) == "launch/train.py"
    assert signal_ranks.out_argument(rank) == "runs/a"
    assert signal_ranks.script_argument(launcher) is None
    assert signal_ranks.script_argument(["bash", "-c", "python launch/train.py"]) is None
    assert signal_ranks.out_argument(["python", "x.py", "--out=runs/b"]) == "runs/b"


def test_only_the_runs_ranks_receive_the_signal(tmp_path: Path) -> None:
    script = tmp_path / "launch" / "train.py"
    script.parent.mkdir()
    marker = tmp_path / "got"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGUSR1, lambda *_: (pathlib.Path(sys.argv[-1] + '.usr1').touch(), sys.exit(75)))\n"
        "pathlib.Path(sys.argv[-1] + '.ready').touch()\n"
        "time.sleep(30)\n")
    ours = subprocess.Popen([sys.executable, "-u", "launch/train.py", "--out", "runs/a", str(marker) + "a"],
                            cwd=tmp_path)
    other = subprocess.Popen([sys.executable, "-u", "launch/train.py", "--out", "runs/b", str(marker) + "b"],
                             cwd=tmp_path)
    try:
        deadline = time.time() + 20
        while not (Path(f"{marker}a.ready").exists() and Path(f"{marker}b.ready").exists()):
            assert time.time() < deadline, "stand-in ranks did not start"
            time.sleep(0.05)
        assert signal_ranks.find_ranks(script, tmp_path / "runs" / "a") == [ours.pid]
        signal_ranks.main([signal.SIGUSR1.name.removeprefix("SIG"), "--script", str(script),
                           "--out", str(tmp_path / "runs" / "a")])
        assert ours.wait(timeout=10) == 75
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


@needs_bash
def test_deepspeed_slurm_backend_is_passed_to_the_multi_node_script() -> None:
    words = dry_run("--nodes", "2", "--launcher", "deepspeed", "--ds-launcher", "slurm")
    assert "DS_MULTINODE_LAUNCHER=slurm" in words and "LAUNCHER=deepspeed" in words
    assert "slurm/train_multi_node.sbatch" in words
