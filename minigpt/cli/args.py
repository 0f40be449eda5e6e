"""Build an argparse parser from a config dataclass, so flags and their help never drift from the fields.
The help is in the user's language (`minigpt.i18n`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from minigpt.i18n import _


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = _(field.metadata.get("help", ""))
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        elif typing.get_origin(kind) is list:
            # extend: `--data a b` and `--data a --data b` both give [a, b] (a repeated flag adds, never replaces)
            parser.add_argument(flag, nargs="+", action="extend", default=default, help=help_text, metavar="PATH")
        elif "const" in field.metadata:  # `--flag` alone means `--flag CONST`
            parser.add_argument(flag, type=kind, nargs="?", const=field.metadata["const"], default=default,
                                help=_("{help} (default: {default})").format(help=help_text, default=repr(default)))
        else:
            parser.add_argument(flag, type=kind, default=default,
                                help=_("{help} (default: {default})").format(help=help_text, default=repr(default)))


def dataclass_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
