"""The Hugging Face Llama format: export a MiniGPT model to it, and import one back, exactly.

MiniGPT is Llama-shaped (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, optional tied
embeddings), so the export is a renaming plus two splits: our fused `qkv_proj` becomes
`q_proj/k_proj/v_proj` and `gate_up_proj` becomes `gate_proj/up_proj`. transformers' Llama rotates
query/key halves the same way we do (`rotate_half`), so no permutation is needed. One table
(`TENSOR_TABLE`) drives both directions, so a round trip is bit-identical by construction.
A mixture-of-experts model exports (one way) as transformers' GraniteMoeShared: see `hf_granitemoe`.

An exported directory holds `model.safetensors`, `config.json` (LlamaForCausalLM), `generation_config.json`,
and the tokenizer as transformers loads it with no custom code: our sentencepiece `tokenizer.model`
plus `tokenizer_config.json` (special tokens, no prefix space, the ChatML `chat_template` in Jinja).
`safetensors` is imported inside the functions that need it (the `hf` extra).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.fsutil import make_staging_dir, staged_directory
from minigpt.i18n import _
from minigpt.interop.common import (
    CHATML_JINJA,
    ExportFormat,
    InteropError,
    check_llama_shaped,
    load_for_export,
    prepare_output,
    register_export_format,
)
from minigpt.interop.hf_granitemoe import (
    MOE_FIELDS,
    moe_hf_config,
    moe_hf_tensors,
    moe_problem,
    moe_tensor_names,
)
from minigpt.interop.hf_tokenizer import (
    HF_TOKENIZER_FILE,
    TokenizerJsonError,
    sentencepiece_model_from_tokenizer_json,
)
from minigpt.model import MiniGPT
from minigpt.tokenizer import (
    BOS,
    CHAT_SYMBOLS,
    EOS,
    IM_END,
    IM_START,
    META_FILE,
    MODEL_FILE,
    PAD,
    SPECIAL_IDS,
    UNK,
    Tokenizer,
    TokenizerError,
)
from minigpt.weights import CONFIG_FILE, WEIGHTS_FILE, check_state_dict, save_consolidated

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Our tensor → the Hugging Face tensors it is split into along dim 0 (in order). Export splits,
# import concatenates: the one name mapping for both directions.
LAYER_TENSORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("blocks.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    ("blocks.{i}.attn.qkv_proj.weight", ("model.layers.{i}.self_attn.q_proj.weight",
                                         "model.layers.{i}.self_attn.k_proj.weight",
                                         "model.layers.{i}.self_attn.v_proj.weight")),
    ("blocks.{i}.attn.o_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    ("blocks.{i}.ffn_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    ("blocks.{i}.ffn.gate_up_proj.weight", ("model.layers.{i}.mlp.gate_proj.weight",
                                            "model.layers.{i}.mlp.up_proj.weight")),
    ("blocks.{i}.ffn.down_proj.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)
MODEL_TENSORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embed.weight", ("model.embed_tokens.weight",)),
    ("norm.weight", ("model.norm.weight",)),
    ("lm_head.weight", ("lm_head.weight",)),
)

# Hugging Face config fields that say nothing about the weights' maths (token ids, bookkeeping).
_IGNORED_HF_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "torchscript", "tie_encoder_decoder", "pruned_heads",
    "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "tf_legacy_loss", "use_bfloat16",
})
# Fields that must hold this value (our model has no bias, one activation, plain RoPE).
_REQUIRED_HF_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "rope_scaling": (None,),
    "pretraining_tp": (1,),
}


# --- weights -----------------------------------------------------------------------------------------

def split_sizes(name: str, config: MiniGPTConfig) -> list[int] | None:
    if name.endswith("qkv_proj.weight"):
        return [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2
    if name.endswith("gate_up_proj.weight"):
        return [config.ffn_hidden_size] * 2
    return None


def tensor_table(config: MiniGPTConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our name, its Hugging Face names) for every tensor of `config`'s model; no lm_head when tied.
    A MoE model's feed-forward tensors are not in it (`moe_hf_tensors` writes those)."""
    layer_rows = [row for row in LAYER_TENSORS if not (config.is_moe and row[0].startswith("blocks.{i}.ffn."))]
    rows = [(ours.format(i=i), tuple(h.format(i=i) for h in theirs))
            for i in range(config.num_layers) for ours, theirs in layer_rows]
    rows += [row for row in MODEL_TENSORS if not (config.tie_embeddings and row[0] == "lm_head.weight")]
    return rows


def to_hf_tensors(state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict as Hugging Face Llama tensors (contiguous copies, `dtype`); a MoE model's as
    GraniteMoeShared tensors (minigpt/interop/hf_granitemoe.py)."""
    table = tensor_table(config)
    moe_names = moe_tensor_names(config) if config.is_moe else set()
    unmapped = sorted(set(state_dict) - {ours for ours, _theirs in table} - moe_names - {"lm_head.weight"})
    if unmapped:
        raise InteropError(_("tensor(s) {names} have no Llama equivalent; this model cannot be exported")
                           .format(names=unmapped[:5]))

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu", dtype).contiguous().clone()

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in table:
        sizes = split_sizes(ours, config)
        parts = state_dict[ours].split(sizes, dim=0) if sizes else (state_dict[ours],)
        for name, part in zip(theirs, parts, strict=True):
            out[name] = convert(part)
    for layer in range(config.num_layers if config.is_moe else 0):
        out.update(moe_hf_tensors(state_dict, config, layer, convert))
    return out


def from_hf_tensors(tensors: Mapping[str, torch.Tensor], config: MiniGPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors as our fp32 state dict for `config` (checked by `check_state_dict`)."""
    table = tensor_table(config)
    known = {name for _ours, theirs in table for name in theirs} | {"lm_head.weight"}
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        hint = _(" (biases are not supported)") if any(n.endswith(".bias") for n in unexpected) else ""
        raise InteropError(_("{source}: tensor(s) {names} have no MiniGPT equivalent{hint}")
                           .format(source=source, names=unexpected[:5], hint=hint))
    state: dict[str, torch.Tensor] = {}
    for ours, theirs in table:
        missing = [name for name in theirs if name not in tensors]
        if missing:
            raise InteropError(_("{source}: missing tensor(s) {names}").format(source=source, names=missing[:5]))
        parts = [tensors[name].to(torch.float32) for name in theirs]
        try:
            state[ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        except RuntimeError as err:
            raise InteropError(_("{source}: tensors {names} do not fit together ({err})")
                               .format(source=source, names=list(theirs), err=err)) from err
    if config.tie_embeddings and "lm_head.weight" in tensors:
        state["lm_head.weight"] = tensors["lm_head.weight"].to(torch.float32)
    return check_state_dict(state, config, source=source)


# --- config ------------------------------------------------------------------------------------------

def check_exportable(config: MiniGPTConfig, moe: bool = False) -> None:
    """Refuse a model with a config field the Llama format cannot express (by the field's name).

    With `moe` (the Hugging Face export), a mixture-of-experts model is accepted as GraniteMoeShared
    when its MoE fields have an exact equivalent there (`hf_granitemoe.moe_problem`)."""
    moe = moe and config.is_moe
    if moe and (problem := moe_problem(config)):
        raise InteropError(problem)
    check_llama_shaped(config, also_exported=MOE_FIELDS if moe else ())


def hf_config(config: MiniGPTConfig, tokenizer: Tokenizer, dtype: str = "fp32") -> dict[str, Any]:
    """`config.json` of the exported LlamaForCausalLM (GraniteMoeSharedForCausalLM for a MoE model)."""
    check_exportable(config, moe=True)
    llama = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": config.dropout, "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype],
    }
    return moe_hf_config(llama, config) if config.is_moe else llama


def config_from_hf(hf: Mapping[str, Any], source: str) -> MiniGPTConfig:
    """Our config for a Hugging Face Llama config.json; refuses, by field, what we cannot run exactly."""
    if not isinstance(hf, Mapping):
        raise InteropError(_("{source}: not a JSON object").format(source=source))
    if hf.get("model_type") != "llama":
        raise InteropError(_("{source}: model_type {value!r} is not supported; MiniGPT imports \"llama\" models only")
                           .format(source=source, value=hf.get("model_type")))
    if hf.get("architectures") not in (None, ["LlamaForCausalLM"]):
        raise InteropError(_("{source}: architectures {value!r} is not supported; expected [\"LlamaForCausalLM\"]")
                           .format(source=source, value=hf.get("architectures")))
    mapped = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_parameters", "tie_word_embeddings", "attention_dropout"}
    for name in sorted(hf):
        if name in _IGNORED_HF_FIELDS or name in mapped:
            continue
        if name not in _REQUIRED_HF_VALUES:
            raise InteropError(_("{source}: field {name!r} is not supported by MiniGPT's Llama import")
                               .format(source=source, name=name))
        if hf[name] not in _REQUIRED_HF_VALUES[name]:
            raise InteropError(_("{source}: field {name}={value!r} is not supported; MiniGPT needs {needed!r}")
                               .format(source=source, name=name, value=hf[name],
                                       needed=_REQUIRED_HF_VALUES[name][0]))
    theta = hf.get("rope_theta")
    rope = hf.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, Mapping) or set(rope) - {"rope_type", "rope_theta"} \
                or rope.get("rope_type", "default") != "default":
            raise InteropError(_("{source}: field rope_parameters={rope!r} is not supported; MiniGPT runs "
                                 "plain (\"default\") rotary embeddings only").format(source=source, rope=rope))
        if theta is not None and rope.get("rope_theta", theta) != theta:
            raise InteropError(_("{source}: rope_parameters.rope_theta {rope_theta} differs from rope_theta {theta}")
                               .format(source=source, rope_theta=rope.get("rope_theta"), theta=theta))
        theta = rope.get("rope_theta", theta)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if name not in hf:
            raise InteropError(_("{source}: field {name!r} is missing").format(source=source, name=name))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and heads and head_dim * heads != hf["hidden_size"]:
        raise InteropError(_("{source}: field head_dim={head_dim} is not hidden_size/num_attention_heads; "
                             "MiniGPT derives the head size from the width").format(source=source, head_dim=head_dim))
    try:
        return MiniGPTConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta if theta is not None else 10000.0), norm_eps=hf.get("rms_norm_eps", 1e-6),
            dropout=hf.get("attention_dropout", 0.0), tie_embeddings=hf.get("tie_word_embeddings", False))
    except ConfigError as err:
        raise InteropError(_("{source}: {err}").format(source=source, err=err)) from err


# --- tokenizer ---------------------------------------------------------------------------------------

def tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` for transformers' LlamaTokenizer."""
    specials = [(SPECIAL_IDS[t], t) for t in (PAD, UNK, BOS, EOS)]
    specials += [(tokenizer.im_start_id, IM_START), (tokenizer.im_end_id, IM_END)]
    added = {str(i): {"content": piece, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True} for i, piece in specials}
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "pad_token": PAD, "extra_special_tokens": list(CHAT_SYMBOLS), "added_tokens_decoder": added,
        # No BOS/EOS added and no prefix space: MiniGPT encodes text as it stands.
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_len, "padding_side": "left",
        "chat_template": CHATML_JINJA,
    }
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                   "additional_special_tokens": list(CHAT_SYMBOLS)}
    return {TOKENIZER_CONFIG_FILE: config, SPECIAL_TOKENS_MAP_FILE: special_map}


# --- export ------------------------------------------------------------------------------------------

def export_hf(model_dir: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the Hugging Face Llama directory `out` for the model in `model_dir`; return `out`.

    Built under a temporary name beside `out` and renamed into place once complete, so a failure
    (a full disk) leaves no half-written export; an existing `out` is replaced only with `force`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise InteropError(_("--dtype {dtype!r}: choose one of {choices}").format(dtype=dtype, choices=sorted(DTYPES)))
    out = Path(out)
    prepare_output(out, force)
    model, tokenizer, _source = load_for_export(model_dir, functools.partial(check_exportable, moe=True))
    config = model.config
    tensors = to_hf_tensors(model.state_dict(), config, DTYPES[dtype])
    with staged_directory(out) as staging:
        try:
            save_file(tensors, str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            raise InteropError(_("{out}: writing {file} failed ({err})")
                               .format(out=out, file=SAFETENSORS_FILE, err=err)) from err
        files = {CONFIG_FILE: hf_config(config, tokenizer, dtype),
                 GENERATION_CONFIG_FILE: {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                                          "pad_token_id": tokenizer.pad_id},
                 **tokenizer_files(tokenizer, config.max_seq_len)}
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        # safetensors creates its file 0600: give it the mode (umask applied) of the files beside it
        os.chmod(staging / SAFETENSORS_FILE, (staging / CONFIG_FILE).stat().st_mode & 0o777)
        shutil.copyfile(tokenizer.directory / MODEL_FILE, staging / MODEL_FILE)
    return out


# --- import ------------------------------------------------------------------------------------------

def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise InteropError(_("{path}: a Hugging Face directory needs the safetensors package "
                             "(pip install -e \".[hf]\")").format(path=hf_dir)) from err

    index_path = hf_dir / SAFETENSORS_INDEX_FILE
    if (hf_dir / SAFETENSORS_FILE).is_file():
        files = [hf_dir / SAFETENSORS_FILE]
    elif index_path.is_file():
        try:
            files = [hf_dir / name for name in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise InteropError(_("{path}: not a safetensors index ({err})").format(path=index_path, err=err)) from err
    else:
        raise InteropError(_("{path}: missing; MiniGPT imports safetensors weights only "
                             "(convert pytorch_model.bin with transformers' save_pretrained)")
                           .format(path=hf_dir / SAFETENSORS_FILE))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise InteropError(_("{path}: cannot be read as safetensors ({err})").format(path=path, err=err)) from err
    return tensors


def hf_dir_tokenizer(hf_dir: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face directory: its sentencepiece `tokenizer.model` (as our export writes
    it), else the same model rebuilt from transformers' `tokenizer.json` (as `save_pretrained` leaves it)."""
    model_path, json_path = hf_dir / MODEL_FILE, hf_dir / HF_TOKENIZER_FILE
    try:
        if model_path.is_file():
            return Tokenizer.from_model_file(model_path)
        if json_path.is_file():
            return Tokenizer.from_model_proto(sentencepiece_model_from_tokenizer_json(json_path), json_path)
    except (TokenizerError, TokenizerJsonError) as err:
        raise InteropError(_("{err} (not a MiniGPT-compatible tokenizer)").format(err=err)) from err
    raise InteropError(_("{path}: no {model_file} or {json_file}; MiniGPT imports sentencepiece byte-fallback BPE "
                         "tokenizers").format(path=hf_dir, model_file=MODEL_FILE, json_file=HF_TOKENIZER_FILE))


def load_hf_llama(hf_dir: str | Path, device: str | torch.device = "cpu") -> tuple[MiniGPT, Tokenizer]:
    """An eval-mode `MiniGPT` and its tokenizer from a Hugging Face Llama directory of a supported shape."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InteropError(_("{path}: cannot be read ({error})").format(path=config_path, error=err)) from err
    config = config_from_hf(hf, str(config_path))
    tokenizer = hf_dir_tokenizer(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise InteropError(_("{path}: its tokenizer has {tokens} tokens, more than vocab_size {vocab_size} in "
                             "{config_path}").format(path=hf_dir, tokens=tokenizer.vocab_size,
                                                     vocab_size=config.vocab_size, config_path=config_path))
    state = from_hf_tensors(_read_safetensors(hf_dir), config, source=str(hf_dir))
    model = MiniGPT(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tokenizer


def import_hf_llama(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face Llama directory into a MiniGPT consolidated directory `out_dir`."""
    hf_dir = Path(hf_dir)
    model, tokenizer = load_hf_llama(hf_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_staging = make_staging_dir(out_dir.parent, f".{out_dir.name}.tokenizer-")
    try:
        source = hf_dir / MODEL_FILE
        model_bytes = source.read_bytes() if source.is_file() else tokenizer.sp.serialized_model_proto()
        (tokenizer_staging / MODEL_FILE).write_bytes(model_bytes)
        meta = {**tokenizer.meta, "checksum": hashlib.sha256(model_bytes).hexdigest()}
        (tokenizer_staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_consolidated(out_dir, model.state_dict(), model.config, tokenizer_staging,
                          extra={"imported_from": str(hf_dir)})
    finally:
        shutil.rmtree(tokenizer_staging, ignore_errors=True)
    return out_dir


def imported_init_dir(hf_dir: str | Path, cache_root: str | Path) -> Path:
    """A consolidated copy of `hf_dir` under `cache_root`, converted once and named by its content.

    Several ranks may call this at once: each converts into its own name and the first rename wins
    (renaming onto an existing non-empty directory fails), so none ever reads a half-written copy."""
    hf_dir = Path(hf_dir)
    digest = hashlib.sha256()
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".jinja", ".safetensors") or path.name == MODEL_FILE):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    target = Path(cache_root) / f"hf-import-{digest.hexdigest()[:16]}"
    if (target / WEIGHTS_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    own = make_staging_dir(target.parent, f".{target.name}.rank-")
    try:
        import_hf_llama(hf_dir, own / "model")
        try:
            os.rename(own / "model", target)
        except OSError:
            if not (target / WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(own, ignore_errors=True)
    return target


register_export_format(ExportFormat(
    name="hf", export=export_hf, output="directory", dtypes=tuple(DTYPES), package="safetensors",
    description="a Hugging Face directory (Llama; GraniteMoeShared for mixtures of experts)"))
