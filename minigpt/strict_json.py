"""JSON read from files a crash, a full disk or another person may have damaged: bounded, finite, flat enough.

`json.loads` accepts `NaN`/`Infinity`, numbers that overflow to infinity, and nesting deep enough to raise
`RecursionError`; read whole, a multi-gigabyte file fills memory. `read_json` refuses all of these with a
`JSONFileError` naming the file and the reason, so a caller can skip the file instead of crashing on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minigpt.i18n import _


class JSONFileError(ValueError):
    """A JSON file that is missing, too large, not UTF-8, not JSON, or holds a non-finite number."""


def _reject_constant(name: str) -> Any:
    raise ValueError(_("{name} is not a JSON number").format(name=name))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(_("{text} overflows to {value}").format(text=text[:40], value=value))
    return value


def loads(text: str, source: str) -> Any:
    """Parse `text` (from `source`, for messages) as strict JSON: finite numbers only."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise JSONFileError(_("{source}: nested too deeply to be a file this program wrote").format(
            source=source)) from None
    except (ValueError, OverflowError) as err:
        raise JSONFileError(_("{path}: not valid JSON ({error})").format(path=source, error=str(err)[:200])) from None


def read_json(path: str | Path, max_bytes: int) -> Any:
    """The JSON value in `path`, read only if it is at most `max_bytes` long (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise JSONFileError(_("{path}: missing").format(path=path)) from None
    except OSError as err:
        raise JSONFileError(_("{path}: cannot be read ({error})").format(
            path=path, error=err.strerror or err)) from None
    if len(data) > max_bytes:
        raise JSONFileError(_("{path}: larger than {limit:,} bytes, too large to be a file this program wrote").format(
            path=path, limit=max_bytes))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONFileError(_("{path}: not UTF-8 text").format(path=path)) from None
    return loads(text, str(path))
