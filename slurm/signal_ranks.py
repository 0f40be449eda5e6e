"""Send a signal to this node's training ranks of one run, and to nothing else.

Used by the sbatch scripts with LAUNCHER=deepspeed: the `deepspeed` launcher does not forward SIGUSR1
and turns SIGINT into SIGTERM, so the batch shell signals the rank processes directly (on other nodes
through `srun --overlap`). A rank is a python process whose script argument is the training script and
whose `--out` is the run directory; the launcher processes (`python -m deepspeed.launcher.launch ...`,
pdsh's `bash -c ...`) carry the same words in other positions and are left alone.

    python slurm/signal_ranks.py USR1 --script launch/train.py --out checkpoints/pretrain_tiny
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def script_argument(argv: list[str]) -> str | None:
    """The script a python command line runs (`python -u x.py ...` → `x.py`), None if not `python script`."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return None
    for arg in argv[1:]:
        if arg in ("-m", "-c"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def out_argument(argv: list[str]) -> str | None:
    """The value of `--out X` or `--out=X` in a command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def find_ranks(script: Path, out: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of processes running `script` with `--out` equal to `out` (paths compared resolved)."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        script_arg, out_arg = script_argument(argv), out_argument(argv)
        if script_arg is None or out_arg is None:
            continue
        if (cwd / script_arg).resolve() == script.resolve() and (cwd / out_arg).resolve() == out.resolve():
            pids.append(int(entry.name))
    return sorted(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("signal", help="signal name without SIG: USR1, TERM, INT")
    parser.add_argument("--script", type=Path, required=True, help="the training script the ranks run")
    parser.add_argument("--out", type=Path, required=True, help="the run directory the ranks were given")
    args = parser.parse_args(argv)
    try:
        signum = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
    except KeyError:
        parser.error(f"unknown signal {args.signal!r}")
    host = os.uname().nodename
    pids = find_ranks(args.script, args.out)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
    print(f"signal_ranks: {signum.name} -> {host} pids {pids or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
