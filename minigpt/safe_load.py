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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# module, class: what DeepSpeed 0.14-0.19 checkpoints hold besides tensors and containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 files, fp32/bf16, offload).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
# Checkpoints of earlier MiniGPT versions pickled numpy's RNG state (an ndarray of uint32).
_TORCH_LOAD = torch.load  # the real one, also while `weights_only_loads()` has replaced it
NUMPY_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType")


class UnsafeFileError(RuntimeError):
    """A torch file that is damaged or holds objects a weights-only load does not allow."""


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


def allowed_globals(numpy_arrays: bool = False) -> list[Any]:
    """The classes a weights-only load may construct besides torch's own: DeepSpeed's when this process
    has imported deepspeed (only DeepSpeed's files hold them, and importing it costs seconds and must never
    happen in a plain run or the generator) and, for legacy RNG files, numpy arrays."""
    found = [_resolve(module, name) for module, name in DEEPSPEED_GLOBALS] if "deepspeed" in sys.modules else []
    if numpy_arrays:
        found += [_resolve(*qualified.rsplit(".", 1)) for qualified in NUMPY_GLOBALS]
    return [obj for obj in found if obj is not None]


def safe_torch_load(path: str | Path, map_location: Any = "cpu", numpy_arrays: bool = False,
                    **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` with the allow-list; a refused or damaged file is an
    `UnsafeFileError` naming it (never a half-read object, never code run)."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed_globals(numpy_arrays)):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(f"{path}: refused to load: it holds objects outside the weights-only allow-list "
                              f"({reason[:200]}); a checkpoint must contain only tensors and plain data") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, OSError) and not Path(str(path)).exists():
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(f"{path}: damaged or not a torch file ({reason[:200]})") from None


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
