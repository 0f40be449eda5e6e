"""The CLIs' shared argparse pieces: a parser that takes no abbreviation and names the flag a typo meant, and
flags built from a config dataclass, so flags and their help never drift from the fields. The help is in the
user's language (`minigpt.i18n`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from collections.abc import Sequence

from minigpt.i18n import _

FLAG_ALIASES = {
    "--lr": "--learning-rate", "--bs": "--batch-size", "--mbs": "--batch-size",
    "--micro-batch-size": "--batch-size", "--per-device-train-batch-size": "--batch-size",
    "--gradient-accumulation-steps": "--grad-accum", "--accum": "--grad-accum",
    "--steps": "--max-steps", "--iters": "--max-steps", "--max-iters": "--max-steps", "--num-steps": "--max-steps",
    "--epochs": "--max-steps", "--num-train-epochs": "--max-steps", "--warmup": "--warmup-steps",
    "--output": "--out", "--output-dir": "--out", "--out-dir": "--out", "--save-dir": "--out",
    "--model-size": "--config", "--block-size": "--seq-len", "--context-length": "--seq-len",
    "--max-seq-len": "--seq-len", "--max-tokens": "--max-new-tokens", "--num-tokens": "--max-new-tokens",
    "--resume-from-checkpoint": "--resume", "--wd": "--weight-decay", "--clip": "--grad-clip",
}
"""Flags other tools use for what a MiniGPT flag does (suggested only where the parser has the target)."""


class FlagParser(argparse.ArgumentParser):
    """An `ArgumentParser` that takes flags only as written (`--max-step` is not `--max-steps`) and answers an
    unknown flag with one error line naming the flag it most likely meant, exit code 2."""

    def __init__(self, **kwargs: typing.Any):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        unknown = self.unknown_flags(argv)
        if unknown:  # before argparse's own checks: a mistyped --model is not reported as a missing one
            self.exit(2, _("{prog}: error: {message}").format(
                prog=self.prog, message=unknown_flags_message(unknown, self.known_flags())) + "\n")
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> typing.NoReturn:
        """argparse's usage line and `PROG: error: MESSAGE`, exit code 2, the frame in the user's language."""
        self.print_usage(sys.stderr)
        self.exit(2, _("{prog}: error: {message}").format(prog=self.prog, message=message) + "\n")

    def unknown_flags(self, argv: list[str]) -> list[str]:
        """The flags in `argv` (before a `--`) that this parser does not define, exactly as written."""
        flags = argv[:argv.index("--")] if "--" in argv else argv
        return [arg for arg in flags if (arg.startswith("--") or arg[:1] == "-" and arg[1:2].isalpha())
                and arg.split("=", 1)[0] not in self._option_string_actions]

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions if action.help != argparse.SUPPRESS
                for flag in action.option_strings if flag.startswith("--")]


def suggest_flag(flag: str, known: list[str]) -> str | None:
    """The known flag `flag` most likely meant: its dashed spelling, a common alias, or the closest name."""
    name = flag.split("=", 1)[0]
    dashed = "--" + name.lstrip("-").replace("_", "-").lower()
    if dashed in known:
        return dashed
    if FLAG_ALIASES.get(dashed) in known:
        return FLAG_ALIASES[dashed]
    close = difflib.get_close_matches(dashed, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_flags_message(flags: list[str], known: list[str]) -> str:
    """`unrecognized argument --max_steps (did you mean --max-steps?); see --help for every flag`."""
    parts = []
    for flag in flags:
        suggestion = suggest_flag(flag, known)
        parts.append(_("{flag} (did you mean {suggestion}?)").format(flag=flag, suggestion=suggestion)
                     if suggestion else flag)
    message = (_("unrecognized argument {flags}; see --help for every flag") if len(flags) == 1
               else _("unrecognized arguments {flags}; see --help for every flag"))
    return message.format(flags=", ".join(parts))



def section_titles() -> dict[str, str]:
    """`--help`'s group title of each `TrainConfig` section, in the user's language."""
    return {"run": _("run"), "model": _("model"), "adapter": _("LoRA adapters"), "data": _("data"), "optim": _("optimisation"),
            "schedule": _("schedule"), "engine": _("engine and distribution"),
            "evaluation": _("evaluation and logging"), "checkpointing": _("output and checkpoints")}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`launch/train.py`'s flags: one `--help` group per `TrainConfig` section, then one per mode with flags of its
    own. A mode's flags are absent from the parsed namespace unless given, so one given to another mode is
    refused by name (`TrainConfig.of`)."""
    from minigpt.config import config_flags, flag_of, key_of

    titles = section_titles()
    for title, cls, fields in config_flags():
        group = parser.add_argument_group(titles.get(title, title))
        hints = typing.get_type_hints(cls)
        for field in fields:
            _add_field(group, flag_of(field), key_of(field), field, hints[field.name], given_only=title not in titles)


def _add_field(group, flag: str, dest: str, field: dataclasses.Field, kind: type, given_only: bool) -> None:
    help_text = _(field.metadata.get("help", "")).replace("%", "%%")  # argparse formats help with %
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    shown = _("{help} (default: {default})").format(help=help_text, default=repr(default))
    value = argparse.SUPPRESS if given_only else default
    if kind is bool:
        group.add_argument(flag, dest=dest, action="store_true", default=value, help=help_text)
    elif typing.get_origin(kind) is list:
        # extend: `--data a b` and `--data a --data b` both give [a, b] (a repeated flag adds, never replaces)
        group.add_argument(flag, dest=dest, nargs="+", action="extend", default=value, help=help_text,
                           metavar="PATH")
    elif "const" in field.metadata:  # `--flag` alone means `--flag CONST`
        group.add_argument(flag, dest=dest, type=kind, nargs="?", const=field.metadata["const"], default=value,
                           help=shown)
    else:
        group.add_argument(flag, dest=dest, type=kind, default=value, help=shown)


def train_config_from_args(args: argparse.Namespace):
    """The `TrainConfig` of a namespace `add_train_arguments` parsed (`ConfigError` names a bad flag)."""
    from minigpt.config import TrainConfig

    return TrainConfig.of(**{key: value for key, value in vars(args).items() if key != "local_rank"})
