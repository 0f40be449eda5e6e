"""What every export format shares: the error type, the output rule, loading a model for export, the
checks of a Llama-shaped model and tokenizer, and the format registry `cli/export.py` dispatches through.

A format is one module that calls `register_export_format` at import time and is named in
`BUILTIN_FORMAT_MODULES`; it imports its own optional package (safetensors, gguf) inside functions only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path

from minigpt.config import MiniGPTConfig
from minigpt.fsutil import sweep_leftovers
from minigpt.i18n import _
from minigpt.model import MiniGPT
from minigpt.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, META_FILE, MODEL_FILE, Tokenizer
from minigpt.weights import CONFIG_FILE, WEIGHTS_FILE, WeightsError, load_consolidated, model_directory

CHATML_JINJA = ("{% for message in messages %}"
                "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
                "{% endfor %}"
                "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}")
"""Our ChatML template (`Tokenizer.encode_chat`) as transformers' `apply_chat_template` renders it."""

EXPORTED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                   "max_seq_len", "rope_theta", "norm_eps", "dropout", "tie_embeddings")
"""MiniGPTConfig fields a Llama config represents. Any other field (a newer feature such as experts)
must still have its default, else the model has no exact Llama equivalent and export is refused."""


class InteropError(WeightsError):
    """A model or directory that cannot be converted exactly; the message names the file and field."""


# --- the format registry -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One `--format` of `launch/export.py`: `export(model_dir, out, dtype=, force=) -> out`."""

    name: str
    export: Callable[..., Path]
    description: str
    """After "NAME: " in --format's help."""
    output: str = "directory"
    """What --out names for this format: "directory" or "file"."""
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    package: str | None = None
    """The optional package the export needs, checked before anything is read."""
    extra: str = "hf"
    """The pip extra that brings `package`."""


EXPORT_FORMATS: dict[str, ExportFormat] = {}
BUILTIN_FORMAT_MODULES = ("minigpt.interop.hf_llama", "minigpt.interop.gguf_llama")


def register_export_format(export_format: ExportFormat) -> ExportFormat:
    """Make `export_format` a choice of `launch/export.py --format` (a name is registered once)."""
    known = EXPORT_FORMATS.get(export_format.name)
    if known is not None and known != export_format:
        raise ValueError(_("export format {name!r} is already registered").format(name=export_format.name))
    EXPORT_FORMATS[export_format.name] = export_format
    return export_format


def export_formats() -> dict[str, ExportFormat]:
    """Every registered format, the built-in ones first (importing their modules registers them)."""
    for module in BUILTIN_FORMAT_MODULES:
        importlib.import_module(module)
    return EXPORT_FORMATS


# --- the output and the model ------------------------------------------------------------------------

def prepare_output(out: Path, force: bool) -> None:
    """Clear what an interrupted export to `out` left beside it (`minigpt.fsutil.sweep_leftovers`: a
    put-aside previous export comes back as `out`), then refuse an existing `out` unless `force`; make its
    parent."""
    sweep_leftovers(out.parent, out.name)
    if out.exists() and not force:
        raise InteropError(_("{out}: already exists; choose another --out or pass --force to replace it")
                           .format(out=out))
    out.parent.mkdir(parents=True, exist_ok=True)


def is_hf_llama_dir(path: str | Path) -> bool:
    """Whether `path` looks like a Hugging Face model directory (config.json with a model_type)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


def check_llama_shaped(config: MiniGPTConfig, also_exported: tuple[str, ...] = ()) -> None:
    """Refuse a model with a config field the Llama format cannot express (by the field's name); the
    fields in `also_exported` are ones the caller's format expresses besides (`EXPORTED_FIELDS`)."""
    for field in dataclasses.fields(config):
        if field.name in EXPORTED_FIELDS or field.name in also_exported:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if getattr(config, field.name) != default:
            raise InteropError(_("model config field {field}={value!r} has no Llama equivalent; only dense "
                                 "Llama-shaped models can be exported")
                               .format(field=field.name, value=getattr(config, field.name)))


def check_exportable_tokenizer(tokenizer: Tokenizer) -> None:
    """Refuse a sentencepiece model whose ids transformers' LlamaTokenizer (and llama.cpp's) would not
    reproduce exactly.

    MiniGPT's trainer writes byte-fallback BPE with identity normalization and no dummy prefix; the
    chat encoding (each segment encoded on its own) equals the rendered template's ids because no
    piece spans a newline (the newline is a piece of its own)."""
    from sentencepiece import sentencepiece_model_pb2

    model_path = tokenizer.directory / MODEL_FILE
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(_("model_type is {kind}, not BPE").format(kind=trainer.ModelType.Name(trainer.model_type)))
    if not trainer.byte_fallback:
        problems.append(_("byte_fallback is off"))
    if normalizer.name not in ("identity", "") or normalizer.precompiled_charsmap:
        problems.append(_("normalization rule {rule!r} is not identity").format(rule=normalizer.name))
    if normalizer.add_dummy_prefix:
        problems.append(_("add_dummy_prefix is on"))
    if normalizer.remove_extra_whitespaces:
        problems.append(_("remove_extra_whitespaces is on"))
    # The newline piece itself is fine (the trainer always gives "\n" one of its own); a longer piece
    # holding a newline could merge across the chat template's line breaks.
    if any("\n" in piece.piece and len(piece.piece) > 1 for piece in proto.pieces):
        problems.append(_("a piece spans a newline (the chat template could merge across it)"))
    if tokenizer.meta.get("chat_template", CHAT_TEMPLATE) != CHAT_TEMPLATE:
        problems.append(_("chat template {template!r} is not {expected}")
                        .format(template=tokenizer.meta.get("chat_template"), expected=CHAT_TEMPLATE))
    if problems:
        raise InteropError(_("{path}: {problem}; transformers would not reproduce its token ids exactly "
                             "(tokenizers from minigpt-train-tokenizer export)")
                           .format(path=model_path, problem=problems[0]))


def load_for_export(model_dir: str | Path,
                    check_config: Callable[[MiniGPTConfig], None] = check_llama_shaped,
                    ) -> tuple[MiniGPT, Tokenizer, Path]:
    """The model and tokenizer of a run directory / `final/` / consolidated directory, with the directory
    they came from; `check_config` refuses what the format cannot express, and the tokenizer must be one
    transformers and llama.cpp reproduce exactly."""
    source = model_directory(model_dir)
    if not (source / WEIGHTS_FILE).is_file() and (source / CONFIG_FILE).is_file() and is_hf_llama_dir(source):
        raise InteropError(_("{path}: is already a Hugging Face Llama directory").format(path=source))
    model, tokenizer = load_consolidated(source)
    if tokenizer is None:
        raise InteropError(_("{path}: has no tokenizer files; an export needs {model_file} and {meta_file}")
                           .format(path=source, model_file=MODEL_FILE, meta_file=META_FILE))
    check_config(model.config)
    check_exportable_tokenizer(tokenizer)
    return model, tokenizer, source
