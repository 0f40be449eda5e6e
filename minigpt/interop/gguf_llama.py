"""GGUF export (llama.cpp, Ollama): the `llama` architecture with the sentencepiece vocabulary inside.

Tensor names and metadata keys follow llama.cpp's own converter (`convert_hf_to_gguf.py`, class
`LlamaModel`). One difference from the Hugging Face layout matters: llama.cpp's `llama` graph rotates
*adjacent* pairs of each query/key head (its "normal" RoPE mode), where we and transformers rotate the
two *halves*. The converter therefore permutes the rows of q and k within each head
(`permute(q, n_head, n_head)`, `permute(k, n_head, n_kv_head)`: split each head into halves and
interleave them); `gguf_permute` is that function, applied to our weights. Norm vectors stay f32 as
the converter writes them. The file is written beside the target, read back with `gguf.GGUFReader` and
compared tensor by tensor before it is renamed into place. `gguf` is imported inside the functions.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.config import MiniGPTConfig
from minigpt.fsutil import fsync_dir, held
from minigpt.i18n import _
from minigpt.interop.common import (
    CHATML_JINJA,
    ExportFormat,
    InteropError,
    load_for_export,
    prepare_output,
    register_export_format,
)
from minigpt.tokenizer import MODEL_FILE, Tokenizer
from minigpt.weights import FINAL_DIR

GGUF_DTYPES = ("fp32", "fp16", "bf16")

# Our tensor → its GGUF name (q/k/v and gate/up are split first, as for the HF export).
LAYER_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
}


def gguf_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order to llama.cpp's interleaved-pair order, per head
    (`LlamaModel.permute` of convert_hf_to_gguf.py, with n_head the heads of this projection)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(state_dict: dict[str, torch.Tensor], config: MiniGPTConfig) -> dict[str, torch.Tensor]:
    """Our fp32 state dict as llama.cpp's tensors (fp32, q/k permuted), in the converter's order."""
    h, hkv, d, f = config.num_heads, config.num_kv_heads, config.head_dim, config.ffn_hidden_size
    out = {"token_embd.weight": state_dict["embed.weight"]}
    for i in range(config.num_layers):
        prefix = f"blocks.{i}."
        q, k, v = state_dict[prefix + "attn.qkv_proj.weight"].split([h * d, hkv * d, hkv * d], dim=0)
        gate, up = state_dict[prefix + "ffn.gate_up_proj.weight"].split([f, f], dim=0)
        parts = {"attn_norm": state_dict[prefix + "attn_norm.weight"], "q": gguf_permute(q, h),
                 "k": gguf_permute(k, hkv), "v": v, "o": state_dict[prefix + "attn.o_proj.weight"],
                 "ffn_norm": state_dict[prefix + "ffn_norm.weight"], "gate": gate, "up": up,
                 "down": state_dict[prefix + "ffn.down_proj.weight"]}
        out.update({LAYER_NAMES[key].format(i=i): tensor for key, tensor in parts.items()})
    out["output_norm.weight"] = state_dict["norm.weight"]
    if not config.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        out["output.weight"] = state_dict["lm_head.weight"]
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in out.items()}


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of the sentencepiece model (types as in its proto, which GGUF shares),
    padded to the model's vocab_size with unused `[PAD{id}]` entries as llama.cpp's converter does."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tokenizer.directory / MODEL_FILE).read_bytes())
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]".encode())
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    return tokens, scores, types


def _metadata(config: MiniGPTConfig, tokenizer: Tokenizer, name: str) -> dict[str, Any]:
    return {"general.name": name, "llama.context_length": config.max_seq_len,
            "llama.embedding_length": config.hidden_size, "llama.block_count": config.num_layers,
            "llama.feed_forward_length": config.ffn_hidden_size, "llama.attention.head_count": config.num_heads,
            "llama.attention.head_count_kv": config.num_kv_heads, "llama.rope.freq_base": config.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": config.norm_eps,
            "llama.rope.dimension_count": config.head_dim, "llama.vocab_size": config.vocab_size,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.bos_token_id": tokenizer.bos_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
            "tokenizer.ggml.unknown_token_id": tokenizer.unk_id,
            "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
            "tokenizer.ggml.eot_token_id": tokenizer.im_end_id,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False, "tokenizer.chat_template": CHATML_JINJA}


def _encode(tensor: torch.Tensor, dtype: str):
    """(array, raw type or None) for GGUFWriter.add_tensor; 1-D tensors (norms) stay f32."""
    import gguf

    array = tensor.numpy()
    if dtype == "fp32" or tensor.ndim == 1:
        return array, None
    if dtype == "fp16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _decode(reader_tensor) -> np.ndarray:
    """A tensor read back by GGUFReader as an f32 array in torch's (row-major) shape."""
    import gguf

    shape = tuple(int(n) for n in reversed(reader_tensor.shape))
    return gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type).astype(np.float32).reshape(shape)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata (scalars, strings, lists) and f32 tensors of a GGUF file, as `gguf.GGUFReader` reads them."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            metadata[field.name] = list(field.contents())
        else:
            metadata[field.name] = field.contents()
    return metadata, {t.name: _decode(t) for t in reader.tensors}


def _verify(path: Path, metadata: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Read `path` back and compare every metadata value and tensor with what was meant to be written."""
    read_meta, read_tensors = read_gguf(path)
    for key, value in metadata.items():
        got = read_meta.get(key)
        same = np.allclose(got, value, rtol=1e-6) if isinstance(value, float) else got == value
        if not same:
            raise InteropError(_("{path}: metadata {key} read back as {got!r}, written {value!r}")
                               .format(path=path, key=key, got=got, value=value))
    if list(read_tensors) != list(expected):
        raise InteropError(_("{path}: tensors read back as {read}..., written {written}...")
                           .format(path=path, read=list(read_tensors)[:5], written=list(expected)[:5]))
    for name, array in expected.items():
        if read_tensors[name].shape != array.shape or not np.array_equal(read_tensors[name], array):
            raise InteropError(_("{path}: tensor {name} differs when read back").format(path=path, name=name))


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the GGUF file `out` for the model in `model_dir`; verified by reading it back, then renamed
    into place (no half-written file is ever left at `out`)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise InteropError(_("--dtype {dtype!r}: choose one of {choices}").format(dtype=dtype, choices=list(GGUF_DTYPES)))
    out = Path(out)
    prepare_output(out, force)
    model, tokenizer, source = load_for_export(model_dir)
    config = model.config
    tensors = gguf_tensors(model.state_dict(), config)
    tokens, scores, types = _vocabulary(tokenizer, config.vocab_size)
    run_name = source.resolve().parent.name if source.name == FINAL_DIR else source.resolve().name
    metadata = _metadata(config, tokenizer, run_name)
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        open(tmp, "xb").close()
        with held(tmp):  # being written: not a leftover for another export's sweep
            writer = gguf.GGUFWriter(str(tmp), "llama")
            writer.add_name(metadata["general.name"])
            writer.add_file_type(file_type)
            writer.add_context_length(config.max_seq_len)
            writer.add_embedding_length(config.hidden_size)
            writer.add_block_count(config.num_layers)
            writer.add_feed_forward_length(config.ffn_hidden_size)
            writer.add_head_count(config.num_heads)
            writer.add_head_count_kv(config.num_kv_heads)
            writer.add_rope_freq_base(config.rope_theta)
            writer.add_layer_norm_rms_eps(config.norm_eps)
            writer.add_rope_dimension_count(config.head_dim)
            writer.add_vocab_size(config.vocab_size)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_bos_token_id(tokenizer.bos_id)
            writer.add_eos_token_id(tokenizer.eos_id)
            writer.add_unk_token_id(tokenizer.unk_id)
            writer.add_pad_token_id(tokenizer.pad_id)
            writer.add_eot_token_id(tokenizer.im_end_id)
            writer.add_add_bos_token(False)
            writer.add_add_eos_token(False)
            writer.add_add_space_prefix(False)
            writer.add_chat_template(CHATML_JINJA)
            expected = {}
            for name, tensor in tensors.items():
                array, raw_dtype = _encode(tensor, dtype)
                writer.add_tensor(name, array, raw_dtype=raw_dtype)
                expected[name] = _decode_written(array, raw_dtype, tensor.shape)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            _verify(tmp, {**metadata, "tokenizer.ggml.tokens": [t.decode() for t in tokens]}, expected)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _decode_written(array: np.ndarray, raw_dtype, shape: torch.Size) -> np.ndarray:
    """What a reader should get back for `array` as written (f32, the tensor's shape)."""
    import gguf

    if raw_dtype is None:
        return array.astype(np.float32).reshape(tuple(shape))
    return gguf.quants.dequantize(array, raw_dtype).astype(np.float32).reshape(tuple(shape))


register_export_format(ExportFormat(
    name="gguf", export=export_gguf, output="file", dtypes=GGUF_DTYPES, package="gguf",
    description="one llama.cpp GGUF file (dense models)"))
