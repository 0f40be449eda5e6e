"""Loading torch files without running code: `weights_only=True` everywhere, DeepSpeed's loads included.

A pickle can name any importable callable, so `torch.load(weights_only=False)` on a checkpoint that
someone else could write runs their code. Our own files need nothing beyond tensors and plain
containers. DeepSpeed's checkpoint engine and `zero_to_fp32` call `torch.load(..., weights_only=False)`
themselves; `weights_only_loads()` makes every `torch.load` inside it a weights-only load that allows
exactly the few DeepSpeed classes its checkpoints hold (a loss scaler, a ZeRO stage enum, fragment
addresses: plain data, no behaviour on unpickling), so a file carrying anything else is refused by
name before a byte of it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minigpt.i18n import _

# module, class: what DeepSpeed 0.14-0.19 checkpoints hold besides tensors and containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 files, fp32/bf16, offload).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
_TORCH_LOAD = torch.load  # the real one, also while `weights_only_loads()` has replaced it


class UnsafeFileError(RuntimeError):
    """A torch file that is damaged or holds objects a weights-only load does not allow."""

    def __init__(self, message: str, refused_global: str | None = None) -> None:
        super().__init__(message)
        self.refused_global = refused_global
        """The module.name of the class or function the file's pickle names, when that is why it was refused."""


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _unpickling_error(path: str | Path, err: Exception) -> UnsafeFileError:
    """Why a weights-only load failed, in our words. Torch's own message begins by suggesting a retry with
    weights_only=False, which runs whatever the file names: none of it is repeated."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        blocked = "is blocked" in text  # torch refuses os.system and the like even when allowed
        return UnsafeFileError(_("{path}: refused to load: unpickling it could run code (it names {name}); only "
                                 "tensors and plain containers are loaded").format(path=path, name=found.group(1)),
                               None if blocked else found.group(1))
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return UnsafeFileError(_("{path}: damaged or not a torch file ({reason})").format(
        path=path, reason=detail.group(1).strip()[:200] if detail else _("not a pickle torch can read")))


def conversion_hint(path: str | Path, refused_global: str) -> str:
    """How to turn a refused state-dict file one trusts into plain tensors: allow the one class it names for a
    single load, keep the tensors, save them beside it."""
    module = refused_global.rsplit(".", 1)[0]
    converted = Path(path).with_name(Path(path).stem + ".converted.pt")
    command = (f"python -c \"import torch, {module}; torch.serialization.add_safe_globals([{refused_global}]); "
               f"sd = torch.load('{path}'); torch.save({{k: v for k, v in sd.items() if torch.is_tensor(v)}}, "
               f"'{converted}')\"")
    return _("if you made the file or trust its source, convert it once: {command}, then check {converted} and put "
             "it in place of {original}").format(command=command, converted=converted.name, original=Path(path).name)


def _resolve(module: str, name: str) -> Any | None:
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def allowed_globals() -> list[Any]:
    """The classes a weights-only load may construct besides torch's own: DeepSpeed's when this process
    has imported deepspeed (only DeepSpeed's files hold them, and importing it costs seconds and must never
    happen in a plain run or the generator)."""
    if "deepspeed" not in sys.modules:
        return []
    found = [_resolve(module, name) for module, name in DEEPSPEED_GLOBALS]
    return [obj for obj in found if obj is not None]


def safe_torch_load(path: str | Path, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` with the allow-list; a refused or damaged file is an
    `UnsafeFileError` naming it (never a half-read object, never code run)."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, OSError) and not Path(str(path)).exists():
            raise
        raise UnsafeFileError(_("{path}: damaged or not a torch file ({reason})").format(
            path=path, reason=_first_line(err)[:200])) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every `torch.load` (DeepSpeed's own included) is `safe_torch_load`."""
    original = torch.load

    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)
        return safe_torch_load(f, map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
