"""Consolidated weights: the one format every engine writes and the generator reads.

A consolidated model directory holds:

- `model.pt`      plain state dict of the unwrapped `MiniGPT` (fp32, CPU tensors), loadable with
                  `torch.load(weights_only=True)`. With tied embeddings `lm_head.weight` may be stored
                  or left out; loading accepts both.
- `config.json`   `{"format": "minigpt-consolidated", "format_version": 1, "model": MiniGPTConfig
                  fields, "tokenizer_checksum": sha256 of tokenizer.model or null, "extra": {...}}`.
- `tokenizer.model`, `tokenizer.json`   copied from the training tokenizer (absent when saved without one).

Writes are atomic: the directory is built under a temporary name, fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minigpt import strict_json
from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.fsutil import staged_directory
from minigpt.model import MiniGPT
from minigpt.safe_load import UnsafeFileError, conversion_hint, safe_torch_load
from minigpt.tokenizer import META_FILE, MODEL_FILE, Tokenizer

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT_NAME = "minigpt-consolidated"
FORMAT_VERSION = 1
CONFIG_BYTES = 1 << 20
"""The most of a config.json that is read (ours are a few hundred bytes)."""
# Prefixes that wrappers (DDP / DeepSpeed, torch.compile) put in front of parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """A consolidated directory that is missing a file or does not match its config or tokenizer."""


def expected_shapes(config: MiniGPTConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the state dict of the model `config` builds (no memory used)."""
    with torch.device("meta"):
        model = MiniGPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _strip_wrapper_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _check_sizes_fixed_by_tensors(tensors: Mapping[str, torch.Tensor], config: MiniGPTConfig, source: str) -> None:
    """Compare num_layers, vocab_size and hidden_size with what the tensors hold, before any model is
    built for `config`: a config.json edited to a huge size fails here by name instead of building it."""
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blocks.")}
    if len(blocks) != config.num_layers:
        raise WeightsError(f"{source}: holds {len(blocks)} transformer blocks, the config's num_layers is "
                           f"{config.num_layers}")
    embed = tensors.get("embed.weight")
    expected = (config.vocab_size, config.hidden_size)
    if isinstance(embed, torch.Tensor) and tuple(embed.shape) != expected:
        field = "vocab_size" if embed.ndim == 2 and embed.shape[1] == config.hidden_size else "hidden_size"
        hint = " (another vocabulary size?)" if field == "vocab_size" else ""
        raise WeightsError(f"{source}: tensor embed.weight has shape {tuple(embed.shape)}, the config expects "
                           f"{expected}: its {field} does not match the weights{hint}")


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig,
                     source: str = "state dict") -> dict[str, torch.Tensor]:
    """Return `state_dict` as complete fp32 CPU tensors for `config`, or raise `WeightsError`.

    Wrapper prefixes are stripped and a left-out tied `lm_head.weight` is filled from `embed.weight`.
    Errors name the tensor and both shapes, so weights for another preset or vocabulary are obvious;
    the layer count and embedding size are checked before the model's shapes are worked out.
    """
    tensors = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    _check_sizes_fixed_by_tensors(tensors, config, source)
    shapes = expected_shapes(config)
    if config.tie_embeddings and "lm_head.weight" not in tensors and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"for a model with {config.num_layers} layers")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor(s) {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}; the weights are for another model shape")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WeightsError(f"{source}: tensor {name} is not a floating-point tensor")
        if tuple(tensor.shape) != shape:
            hint = " (another vocabulary size?)" if name in ("embed.weight", "lm_head.weight") else ""
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                               f"expects {shape}{hint}")
    converted = {name: tensors[name].detach().to("cpu", torch.float32).contiguous() for name in shapes}
    if config.tie_embeddings:
        if not torch.equal(converted["lm_head.weight"], converted["embed.weight"]):
            raise WeightsError(f"{source}: config ties embeddings but lm_head.weight differs from embed.weight")
        converted["lm_head.weight"] = converted["embed.weight"]  # one storage, saved once
    return converted


def save_consolidated(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig,
                      tokenizer_dir: str | Path | None, extra: dict[str, Any] | None = None) -> Path:
    """Write a consolidated model directory atomically and return its path.

    `state_dict` is checked against `config` first (see `check_state_dict`), so a wrong shape fails
    here rather than at load time. An existing `out_dir` is replaced only once the new one is complete.
    `extra` (JSON-serialisable: step, mode, tokens seen...) is recorded in config.json.
    """
    out_dir = Path(out_dir)
    tensors = check_state_dict(state_dict, config, source=f"weights for {out_dir}")
    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": config.to_dict(),
            "tokenizer_checksum": tokenizer.checksum if tokenizer else None, "extra": extra or {}}
    with staged_directory(out_dir) as tmp_dir:
        torch.save(tensors, tmp_dir / WEIGHTS_FILE)
        (tmp_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            for name in (MODEL_FILE, META_FILE):
                shutil.copyfile(tokenizer.directory / name, tmp_dir / name)
    return out_dir


FINAL_DIR = "final"
"""Where a training run keeps its consolidated weights: a run directory names its `final/` model."""


def model_directory(path: str | Path) -> Path:
    """The consolidated directory `path` names: itself, or a run directory's `final/`."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / FINAL_DIR / CONFIG_FILE).is_file():
        return path / FINAL_DIR
    return path


def read_consolidated_meta(model_dir: str | Path) -> tuple[MiniGPTConfig, dict[str, Any]]:
    """The model config and the whole config.json of a consolidated directory (or a run directory's final/)."""
    model_dir = model_directory(model_dir)
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise WeightsError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a consolidated model directory needs {CONFIG_FILE}, "
                           f"{WEIGHTS_FILE} and the tokenizer files")
    try:
        meta = strict_json.read_json(path, CONFIG_BYTES)
    except strict_json.JSONFileError as err:
        raise WeightsError(str(err)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or "model" not in meta:
        raise WeightsError(f"{path}: not a MiniGPT consolidated config (expected \"format\": \"{FORMAT_NAME}\" "
                           f"and a \"model\" section)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {meta.get('format_version')!r}; this MiniGPT reads "
                           f"version {FORMAT_VERSION}")
    if not isinstance(meta.get("tokenizer_checksum"), (str, type(None))):
        raise WeightsError(f"{path}: tokenizer_checksum must be a string or null")
    if not isinstance(meta.get("extra", {}), dict):
        raise WeightsError(f"{path}: extra must be an object")
    try:
        config = MiniGPTConfig.from_dict(meta["model"], source=str(path))
    except ConfigError as err:
        message = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
        raise ConfigError(message) from err
    except TypeError as err:
        raise ConfigError(f"{path}: \"model\" section is not a field mapping ({err})") from err
    return config, meta


def load_consolidated(model_dir: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[MiniGPT, Tokenizer | None]:
    """Load a consolidated directory (or a run directory's final/) into an eval-mode `MiniGPT` on `device`,
    with its tokenizer.

    The tokenizer is None only when the directory was saved without one. Raises `WeightsError`
    (missing file, wrong shapes, tokenizer not the one recorded) or `ConfigError` (bad config.json).
    """
    model_dir = model_directory(model_dir)
    config, meta = read_consolidated_meta(model_dir)
    tokenizer = _load_tokenizer(model_dir, meta.get("tokenizer_checksum"), config)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise WeightsError(f"{weights_path}: missing; the model directory has no weights file")
    try:
        state_dict = safe_torch_load(weights_path)
    except UnsafeFileError as err:
        hint = f"; {conversion_hint(weights_path, err.refused_global)}" if err.refused_global else ""
        raise WeightsError(f"{err}{hint}") from None
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{weights_path}: holds a {type(state_dict).__name__}, not a state dict")
    tensors = check_state_dict(state_dict, config, source=str(weights_path))
    model = MiniGPT(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), tokenizer


def _load_tokenizer(model_dir: Path, checksum: str | None, config: MiniGPTConfig) -> Tokenizer | None:
    present = [name for name in (MODEL_FILE, META_FILE) if (model_dir / name).is_file()]
    if checksum is None and not present:
        return None
    for name in (MODEL_FILE, META_FILE):
        if name not in present:
            raise WeightsError(f"{model_dir / name}: missing; the tokenizer files must sit beside the weights")
    tokenizer = Tokenizer(model_dir)
    if checksum is not None and tokenizer.checksum != checksum:
        raise WeightsError(f"{model_dir / MODEL_FILE}: checksum {tokenizer.checksum[:12]} does not match "
                           f"{model_dir / CONFIG_FILE} tokenizer_checksum {checksum[:12]}; the model was "
                           f"trained with another tokenizer")
    if tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(f"{model_dir / MODEL_FILE}: {tokenizer.vocab_size} tokens, more than the model's "
                           f"vocab_size {config.vocab_size}")
    return tokenizer
