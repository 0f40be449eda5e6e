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
from minigpt.i18n import _
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
        raise WeightsError(_("{source}: holds {blocks} transformer blocks, the config's num_layers is "
                             "{layers}").format(source=source, blocks=len(blocks), layers=config.num_layers))
    embed = tensors.get("embed.weight")
    expected = (config.vocab_size, config.hidden_size)
    if isinstance(embed, torch.Tensor) and tuple(embed.shape) != expected:
        field = "vocab_size" if embed.ndim == 2 and embed.shape[1] == config.hidden_size else "hidden_size"
        hint = _(" (another vocabulary size?)") if field == "vocab_size" else ""
        raise WeightsError(_("{source}: tensor embed.weight has shape {shape}, the config expects {expected}: its "
                             "{field} does not match the weights{hint}").format(
            source=source, shape=tuple(embed.shape), expected=expected, field=field, hint=hint))


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig,
                     source: str | None = None) -> dict[str, torch.Tensor]:
    """Return `state_dict` as complete fp32 CPU tensors for `config`, or raise `WeightsError`.

    Wrapper prefixes are stripped and a left-out tied `lm_head.weight` is filled from `embed.weight`.
    Errors name the tensor and both shapes, so weights for another preset or vocabulary are obvious;
    the layer count and embedding size are checked before the model's shapes are worked out.
    """
    source = _("state dict") if source is None else source
    tensors = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    _check_sizes_fixed_by_tensors(tensors, config, source)
    shapes = expected_shapes(config)
    if config.tie_embeddings and "lm_head.weight" not in tensors and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise WeightsError(_("{source}: missing tensor(s) {names}{more} for a model with {layers} layers").format(
            source=source, names=missing[:5], more=" ..." if len(missing) > 5 else "", layers=config.num_layers))
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise WeightsError(_("{source}: unexpected tensor(s) {names}{more}; the weights are for another model "
                             "shape").format(source=source, names=unexpected[:5],
                                             more=" ..." if len(unexpected) > 5 else ""))
    for name, shape in shapes.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WeightsError(_("{source}: tensor {name} is not a floating-point tensor").format(
                source=source, name=name))
        if tuple(tensor.shape) != shape:
            hint = _(" (another vocabulary size?)") if name in ("embed.weight", "lm_head.weight") else ""
            raise WeightsError(_("{source}: tensor {name} has shape {shape}, the config expects "
                                 "{expected}{hint}").format(
                source=source, name=name, shape=tuple(tensor.shape), expected=shape, hint=hint))
    converted = {name: tensors[name].detach().to("cpu", torch.float32).contiguous() for name in shapes}
    if config.tie_embeddings:
        if not torch.equal(converted["lm_head.weight"], converted["embed.weight"]):
            raise WeightsError(_("{source}: config ties embeddings but lm_head.weight differs from "
                                 "embed.weight").format(
                source=source))
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
    tensors = check_state_dict(state_dict, config, source=_("weights for {path}").format(path=out_dir))
    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(_("tokenizer {path} has {tokens} tokens but the model's vocab_size is {vocab}").format(
            path=tokenizer_dir, tokens=tokenizer.vocab_size, vocab=config.vocab_size))
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
        raise WeightsError(_("model directory not found: {path}").format(path=model_dir))
    if not path.is_file():
        raise WeightsError(_("{path}: missing; a consolidated model directory needs {config}, {weights} and the "
                             "tokenizer files").format(path=path, config=CONFIG_FILE, weights=WEIGHTS_FILE))
    try:
        meta = strict_json.read_json(path, CONFIG_BYTES)
    except strict_json.JSONFileError as err:
        raise WeightsError(str(err)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or "model" not in meta:
        raise WeightsError(_("{path}: not a MiniGPT consolidated config (expected \"format\": \"{format}\" and a "
                             "\"model\" section)").format(path=path, format=FORMAT_NAME))
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(_("{path}: format_version {found!r}; this MiniGPT reads version {version}").format(
            path=path, found=meta.get("format_version"), version=FORMAT_VERSION))
    if not isinstance(meta.get("tokenizer_checksum"), (str, type(None))):
        raise WeightsError(_("{path}: tokenizer_checksum must be a string or null").format(path=path))
    if not isinstance(meta.get("extra", {}), dict):
        raise WeightsError(_("{path}: extra must be an object").format(path=path))
    try:
        config = MiniGPTConfig.from_dict(meta["model"], source=str(path))
    except ConfigError as err:
        message = str(err) if str(err).startswith(str(path)) else _("{path}: {error}").format(path=path, error=err)
        raise ConfigError(message) from err
    except TypeError as err:
        raise ConfigError(_("{path}: \"model\" section is not a field mapping ({error})").format(
            path=path, error=err)) from err
    return config, meta


def load_consolidated(model_dir: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[MiniGPT, Tokenizer | None]:
    """Load a consolidated directory (or a run directory's final/) into an eval-mode `MiniGPT` on `device`,
    with its tokenizer.

    The tokenizer is None only when the directory was saved without one. Raises `WeightsError`
    (missing file, wrong shapes, tokenizer not the one recorded) or `ConfigError` (bad config.json).
    """
    model_dir = model_directory(model_dir)
    config, tokenizer = read_consolidated_tokenizer(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise WeightsError(_("{path}: missing; the model directory has no weights file").format(path=weights_path))
    try:
        state_dict = safe_torch_load(weights_path)
    except UnsafeFileError as err:
        if err.refused_global:
            raise WeightsError(_("{error}; {hint}").format(
                error=err, hint=conversion_hint(weights_path, err.refused_global))) from None
        raise WeightsError(str(err)) from None
    if not isinstance(state_dict, dict):
        raise WeightsError(_("{path}: holds a {kind}, not a state dict").format(
            path=weights_path, kind=type(state_dict).__name__))
    tensors = check_state_dict(state_dict, config, source=str(weights_path))
    model = MiniGPT(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), tokenizer


def read_consolidated_tokenizer(model_dir: str | Path) -> tuple[MiniGPTConfig, Tokenizer | None]:
    """The model config and tokenizer of a consolidated directory, checked as `load_consolidated` checks them,
    without reading the weights (for --dry-run)."""
    model_dir = model_directory(model_dir)
    config, meta = read_consolidated_meta(model_dir)
    return config, _load_tokenizer(model_dir, meta.get("tokenizer_checksum"), config)


def _load_tokenizer(model_dir: Path, checksum: str | None, config: MiniGPTConfig) -> Tokenizer | None:
    present = [name for name in (MODEL_FILE, META_FILE) if (model_dir / name).is_file()]
    if checksum is None and not present:
        return None
    for name in (MODEL_FILE, META_FILE):
        if name not in present:
            raise WeightsError(_("{path}: missing; the tokenizer files must sit beside the weights").format(
                path=model_dir / name))
    tokenizer = Tokenizer(model_dir)
    if checksum is not None and tokenizer.checksum != checksum:
        raise WeightsError(_("{path}: checksum {checksum} does not match {config} tokenizer_checksum {recorded}; the "
                             "model was trained with another tokenizer").format(
            path=model_dir / MODEL_FILE, checksum=tokenizer.checksum[:12], config=model_dir / CONFIG_FILE,
            recorded=checksum[:12]))
    if tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(_("{path}: {tokens} tokens, more than the model's vocab_size {vocab}").format(
            path=model_dir / MODEL_FILE, tokens=tokenizer.vocab_size, vocab=config.vocab_size))
    return tokenizer
