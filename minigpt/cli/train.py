"""Train a MiniGPT model: `python launch/train.py ...` (one device) or `deepspeed launch/train.py ...`.

Every flag mirrors a field of `minigpt.config.TrainConfig`: of its sections, or of a mode's own options; `--help`
lists them in those groups. Exit codes:
0 finished, 75 stopped by a signal (or the deepspeed launcher's exit) after saving (rerun with --auto-resume),
130 aborted by a second Ctrl-C before a checkpoint was being written, 2 bad usage.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys

from minigpt.cli.args import FlagParser, add_train_arguments, train_config_from_args
from minigpt.config import ConfigError
from minigpt.i18n import _
from minigpt.signals import EXIT_PREEMPTED, StopRequest, say, tolerate_lost_output, watch_launcher


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/train.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    # The deepspeed launcher appends --local_rank=N; the rank is also in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def process_started() -> float:
    """When this process started, on the `time.monotonic()` clock: a --max-time budget counts the interpreter's
    start-up and imports too, as `time` and a Slurm --time limit do."""
    import time

    import psutil

    age = max(0.0, time.time() - psutil.Process().create_time())
    return time.monotonic() - age


def main(argv: list[str] | None = None) -> int:
    # A rank that the C++ runtime aborts (gloo, NCCL, a kernel: "terminate called ...") or that segfaults
    # prints every thread's Python stack, so the log says where the run was, not only the C++ message.
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (a notebook): skip
            pass
    # Catch stop signals before the slow imports and setup: a preemption during start-up must not kill
    # the rank with Python's default action (the run then stops at its first step boundary).
    stop = StopRequest().install()
    try:
        return _main(stop, argv)
    finally:
        stop.uninstall()  # in-process callers (a notebook, a test) get their handlers back


def _main(stop: StopRequest, argv: list[str] | None) -> int:
    # Ctrl-C on `train.py | tee log` stops tee too: output to the dead pipe must not stop the save.
    tolerate_lost_output()
    watch_launcher(stop)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = train_config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))
    from minigpt.train.loop import USER_ERRORS, dry_run, train

    try:
        code = dry_run(cfg) if cfg.dry_run else train(cfg, stop, started=process_started())
    except USER_ERRORS as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        from minigpt.checkpoint import is_disk_full

        if not is_disk_full(err, cfg.run_dir):
            raise
        where = getattr(err, "filename", None) or cfg.run_dir
        problem = _("disk full while writing {path}: free space, then rerun with --auto-resume (the last complete "
                    "checkpoint is untouched)").format(path=where)
        print(_("error: {error}").format(error=problem), file=sys.stderr)
        return 2
    if code == EXIT_PREEMPTED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank says how it ended: its launcher (DeepSpeed's per-node one, srun) may not, and on
        # several nodes each rank's log is often all there is.
        say(_("rank {rank} stopped; exiting with code {code}").format(rank=os.environ.get("RANK", "?"), code=code))
    return code


if __name__ == "__main__":
    sys.exit(main())
