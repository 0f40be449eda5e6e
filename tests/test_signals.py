import os
import signal
import subprocess
import sys
import textwrap
import time

from minigpt.signals import EXIT_ABORTED, StopRequest

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
