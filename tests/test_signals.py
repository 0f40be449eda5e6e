import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ports import free_port

from minigpt.signals import EXIT_ABORTED, EXIT_PREEMPTED, LostOutputTolerant, StopRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_and_sigusr1_set_the_flag_without_stopping_the_process():
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        stop = StopRequest().install()
        try:
            assert not stop.requested
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == signal.Signals(sig).name
        finally:
            stop.uninstall()


def test_uninstall_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    StopRequest().install().uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_second_sigint_exits_at_once_with_the_documented_code():
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {REPO!r})
        from minigpt.signals import StopRequest
        stop = StopRequest().install()
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None, "the first SIGINT must only request a stop"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == EXIT_ABORTED
    assert "second SIGINT" in proc.stderr.read()


def test_a_run_aborted_in_native_code_prints_where_python_was():
    """A rank that the C++ runtime aborts (gloo, NCCL, a kernel: "terminate called ...") shows its Python
    stack in the log, not only the C++ message; the loop is replaced by a wait so the abort lands in it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        import minigpt.train.loop as loop
        def train(cfg, stop, started):
            print("training", flush=True)
            time.sleep(60)
        loop.train = train
        from minigpt.cli.train import main
        sys.exit(main(["--mode", "pretrain", "--config", "tiny"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(signal.SIGABRT)
    assert proc.wait(timeout=10) == -signal.SIGABRT
    stderr = proc.stderr.read()
    assert "Fatal Python error: Aborted" in stderr
    assert " in train\n" in stderr and "minigpt/cli/train.py" in stderr, stderr


def test_a_second_sigint_while_a_checkpoint_is_written_waits_for_it_then_exits_75():
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {REPO!r})
        from minigpt.signals import StopRequest
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        with stop.saving():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            print("checkpoint complete", flush=True)
        print("after the save", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_PREEMPTED, done.stderr
    assert done.stdout.splitlines() == ["checkpoint complete"]
    assert "second SIGINT: a checkpoint is being written" in done.stderr


def test_output_to_a_pipe_whose_reader_died_goes_to_devnull_instead_of_raising():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (tee) is gone
    stream = LostOutputTolerant(open(write_end, "w", buffering=1, encoding="utf-8"))
    try:
        stream.write("step 12 saved\n")
        stream.flush()
        print("more output", file=stream, flush=True)
        assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull)
    finally:
        stream.close()


def test_a_rank_sees_its_launcher_chain_broken_when_the_top_process_is_killed():
    """rank -> launcher -> runner, as `deepspeed` starts them: killing the runner alone (it passes no signal
    on) leaves the launcher and the rank running; the rank notices from the chain of parents."""
    rank = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        import psutil
        from minigpt.signals import launcher_gone
        parent = psutil.Process().parent()
        chain = [parent, parent.parent()]
        print("ready" if not launcher_gone(chain) else "broken at start", flush=True)
        deadline = time.monotonic() + 30
        while not launcher_gone(chain) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("launcher gone" if launcher_gone(chain) else "not noticed in 30 s", flush=True)
    """)
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}])"
    runner = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; "
                                                     f"subprocess.run([sys.executable, '-c', {launcher!r}])"],
                              stdout=subprocess.PIPE, text=True)
    assert runner.stdout.readline().strip() == "ready"
    runner.kill()
    runner.wait()
    assert runner.stdout.readline().strip() == "launcher gone"


COMMON = ["--config", "tiny", "--seq-len", "64", "--warmup-steps", "3", "--eval-interval", "0", "--log-interval", "1",
          "--max-steps", "400", "--save-interval", "1000"]


def wait_for_steps(run_dir: Path, steps: int, *procs: subprocess.Popen) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not get going"
        time.sleep(0.05)


def wait_for_group_exit(group: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)
    raise AssertionError(f"processes of group {group} still running after {seconds} s")


def saved_checkpoint(run_dir: Path) -> Path:
    return run_dir / "ckpt" / (run_dir / "latest").read_text().strip()


@pytest.mark.integration
def test_ctrl_c_through_tee_saves_and_exits_75_although_the_pipe_died(shards, data_tokenizer, tmp_path):
    """`train.py 2>&1 | tee log`, then Ctrl-C: the terminal signals tee too, so the run's output becomes a
    broken pipe; the run still saves and exits 75."""
    out = tmp_path / "run"
    tee = subprocess.Popen(["tee", str(tmp_path / "log")], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           process_group=0)  # a pipeline's own group, as a shell makes it
    train = subprocess.Popen([sys.executable, "launch/train.py", *COMMON, "--batch-size", "8", "--data", str(shards),
                              "--tokenizer", str(data_tokenizer.directory), "--out", str(out)],
                             cwd=REPO, stdout=tee.stdin, stderr=subprocess.STDOUT, process_group=tee.pid,
                             env={**os.environ, "PYTHONPATH": REPO})
    tee.stdin.close()
    try:
        wait_for_steps(out, 3, train, tee)
        os.killpg(tee.pid, signal.SIGINT)  # one Ctrl-C, to the terminal's foreground group: tee and the run
        assert tee.wait(timeout=10) == -signal.SIGINT
        assert train.wait(timeout=120) == EXIT_PREEMPTED
    finally:
        wait_for_group_exit(tee.pid, 10)
    state = json.loads((saved_checkpoint(out) / "trainer_state.json").read_text())
    assert 3 <= state["step"] < 400 and not (out / "final").exists()


@pytest.mark.integration
@pytest.mark.deepspeed
# SIGTERM only: SIGINT to the runner alone takes the same path (the runner dies, the ranks' watch notices).
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_signal_to_the_deepspeed_runner_alone_makes_both_ranks_save_the_same_step(shards, data_tokenizer,
                                                                                  tmp_path, sig):
    """`kill RUNNER` (a scheduler or a container runtime signals only the process it started): DeepSpeed's
    runner passes nothing on, so the ranks notice their launcher chain break, save one step and exit 75."""
    pytest.importorskip("deepspeed", reason="a real 2-rank DeepSpeed launch")
    out, log = tmp_path / "run", tmp_path / "log"
    with open(log, "w") as log_file:
        runner = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                                   "launch/train.py", *COMMON, "--batch-size", "4", "--data", str(shards),
                                   "--tokenizer", str(data_tokenizer.directory), "--out", str(out),
                                   "--ds-config", "ds_configs/zero2.json"],
                                  cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PYTHONPATH": REPO})
        try:
            wait_for_steps(out, 3, runner)
            runner.send_signal(sig)
            runner.wait(timeout=30)
        finally:
            wait_for_group_exit(runner.pid)
    output = log.read_text()
    assert "the deepspeed launcher" in output and "exited: saving a checkpoint" in output, output[-3000:]
    assert "exits with return code = 75" in output, output[-3000:]  # the rank's code, as the launcher logs it
    checkpoint = saved_checkpoint(out)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert 3 <= state["step"] < 400 and not (out / "final").exists()
    assert sorted(p.name for p in checkpoint.glob("rng_rank*")) == ["rng_rank0.json", "rng_rank1.json"]
    assert f"stopped at step {state['step']} (deepspeed launcher exited); checkpoint saved" in output
