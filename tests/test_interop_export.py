"""Export to the Hugging Face Llama layout and GGUF, and import back: exact round trips, refusals by name,
no half-written output. The parity tests against transformers itself are in test_interop_transformers.py."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from interop_models import random_model, save_model
from spm_fixture import build_tokenizer

pytest.importorskip("safetensors", reason="the Hugging Face export needs safetensors (pip install -e '.[hf]')")

from minigpt.cli import export as export_cli  # noqa: E402
from minigpt.cli import generate as generate_cli  # noqa: E402
from minigpt.config import TrainConfig  # noqa: E402
from minigpt.generate import TextGenerator  # noqa: E402
from minigpt.interop.hf_llama import SAFETENSORS_FILE, export_hf, import_hf_llama  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402
from minigpt.train.loop import find_starting_weights  # noqa: E402
from minigpt.weights import WeightsError, load_consolidated  # noqa: E402


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory, data_tokenizer) -> Path:
    model = random_model(data_tokenizer.vocab_size, seed=1, tie_embeddings=request.param)
    return save_model(tmp_path_factory.mktemp("model") / "final", model, data_tokenizer)


@pytest.fixture(scope="module")
def hf_dir(model_dir, tmp_path_factory) -> Path:
    return export_hf(model_dir, tmp_path_factory.mktemp("hf") / "export")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, data_tokenizer) -> Path:
    """One model directory for the tests whose subject is not the weights (CLI, refusals)."""
    model = random_model(data_tokenizer.vocab_size, seed=2)
    return save_model(tmp_path_factory.mktemp("tied") / "final", model, data_tokenizer)


@pytest.fixture(scope="module")
def tied_hf_dir(tied_dir, tmp_path_factory) -> Path:
    return export_hf(tied_dir, tmp_path_factory.mktemp("hf") / "export")


def assert_same_model_dir(a: Path, b: Path) -> None:
    model_a, tok_a = load_consolidated(a)
    model_b, tok_b = load_consolidated(b)
    assert model_a.config == model_b.config
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert tok_a.checksum == tok_b.checksum


def test_minigpt_to_hf_to_minigpt_is_bit_identical(model_dir, hf_dir, tmp_path):
    back = import_hf_llama(hf_dir, tmp_path / "back")
    assert_same_model_dir(model_dir, back)


def test_hf_export_holds_the_files_transformers_loads_and_no_minigpt_tokenizer_json(hf_dir, model_dir):
    names = sorted(p.name for p in hf_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((hf_dir / "config.json").read_text())
    model, tokenizer = load_consolidated(model_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == model.config.tie_embeddings
    assert config["num_key_value_heads"] == model.config.num_kv_heads
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == [
        tokenizer.eos_id, tokenizer.im_end_id]
    from safetensors.torch import load_file

    tensors = load_file(str(hf_dir / SAFETENSORS_FILE))
    assert ("lm_head.weight" in tensors) == (not model.config.tie_embeddings)
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_choice_stores_weights_rounded_to_that_dtype(model_dir, tmp_path, dtype, torch_dtype):
    from safetensors.torch import load_file

    out = export_hf(model_dir, tmp_path / "hf", dtype=dtype)
    tensors = load_file(str(out / SAFETENSORS_FILE))
    model, _ = load_consolidated(model_dir)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert torch.equal(tensors["model.embed_tokens.weight"], model.embed.weight.detach().to(torch_dtype))


def test_generator_and_init_from_accept_an_hf_directory(model_dir, hf_dir, tmp_path):
    reference, _ = load_consolidated(model_dir)
    generator = TextGenerator.from_dir(hf_dir)
    ids = torch.tensor([[5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(generator.model(ids), reference(ids))
    start = find_starting_weights(TrainConfig.of(mode="sft", init_from=str(hf_dir), out=str(tmp_path / "run")))
    assert start.source == str(hf_dir)
    assert_same_model_dir(model_dir, start.model_dir)
    again = find_starting_weights(TrainConfig.of(mode="sft", init_from=str(hf_dir), out=str(tmp_path / "run")))
    assert again.model_dir == start.model_dir  # converted once


def test_cli_exports_from_a_run_directory_and_refuses_an_existing_out_unless_forced(tied_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tied_dir, run_dir / "final")
    out = tmp_path / "hf"
    assert export_cli.main(["--model", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert (out / SAFETENSORS_FILE).is_file()
    capsys.readouterr()
    assert export_cli.main(["--model", str(run_dir), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and "--force" in err and "\n" not in err
    (out / "marker").write_text("old export")
    assert export_cli.main(["--model", str(run_dir), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no staging left behind


def test_a_full_disk_leaves_no_export_behind(tied_dir, tmp_path, capsys):
    """The exporter writes into a temporary directory: a write that fails (here at a file-size limit,
    as at a full disk) leaves neither --out nor the temporary directory, and exits with one error line."""
    out = tmp_path / "exports" / "hf"
    out.parent.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write raises instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code = export_cli.main(["--model", str(tied_dir), "--format", "hf", "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2
    assert capsys.readouterr().err.startswith("error:")
    assert list(out.parent.iterdir()) == []


def test_export_refuses_a_tokenizer_transformers_would_encode_differently(tmp_path, capsys):
    tokenizer = Tokenizer(build_tokenizer(tmp_path / "tok"))  # sentencepiece's default dummy prefix
    model_dir = save_model(tmp_path / "model", random_model(tokenizer.vocab_size), tokenizer)
    assert export_cli.main(["--model", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "add_dummy_prefix" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def _moe_dir(directory: Path, tokenizer: Tokenizer, **overrides) -> Path:
    import dataclasses

    from minigpt.config import get_config
    from minigpt.model import MiniGPT

    torch.manual_seed(0)
    config = dataclasses.replace(get_config("tiny-moe"), vocab_size=tokenizer.vocab_size, num_layers=2, **overrides)
    return save_model(directory, MiniGPT(config), tokenizer)


def test_gguf_export_refuses_a_mixture_of_experts_model_by_its_field(data_tokenizer, tmp_path, capsys):
    moe = _moe_dir(tmp_path / "moe", data_tokenizer)
    out = tmp_path / "m.gguf"
    assert export_cli.main(["--model", str(moe), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "num_experts" in err and "no Llama equivalent" in err
    assert not out.exists()


def test_hf_export_writes_a_moe_preset_as_granitemoeshared(data_tokenizer, tmp_path):
    from safetensors.torch import load_file

    moe = _moe_dir(tmp_path / "moe", data_tokenizer)  # 4 experts, top-2, 1 shared expert, ffn 128
    out = tmp_path / "hf"
    assert export_cli.main(["--model", str(moe), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteMoeSharedForCausalLM"] and config["model_type"] == "granitemoeshared"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["shared_intermediate_size"]) == (4, 2, 128)
    assert (config["embedding_multiplier"], config["residual_multiplier"], config["logits_scaling"]) == (1, 1, 1)
    assert config["attention_multiplier"] == 32 ** -0.5  # head_dim = hidden 128 / 4 heads
    tensors = load_file(str(out / SAFETENSORS_FILE))
    ours = load_consolidated(moe)[0].state_dict()
    prefix = "model.layers.1.block_sparse_moe."
    assert torch.equal(tensors[prefix + "input_linear.weight"][3], ours["blocks.1.ffn.experts.3.gate_up_proj.weight"])
    assert torch.equal(tensors[prefix + "output_linear.weight"][3], ours["blocks.1.ffn.experts.3.down_proj.weight"])
    assert torch.equal(tensors[prefix + "router.layer.weight"], ours["blocks.1.ffn.router.weight"])
    assert torch.equal(tensors["model.layers.1.shared_mlp.input_linear.weight"], ours["blocks.1.ffn.shared.0.gate_up_proj.weight"])


@pytest.mark.parametrize(("overrides", "field"), [
    ({"experts_per_token": 1}, "experts_per_token=1"),
    ({"moe_capacity_factor": 1.25}, "moe_capacity_factor=1.25"),
    ({"moe_capacity_factor": 1.25, "num_shared_experts": 0}, "moe_capacity_factor=1.25"),
])
def test_hf_export_refuses_moe_routing_granitemoeshared_cannot_reproduce(data_tokenizer, tmp_path, capsys,
                                                                          overrides, field):
    moe = _moe_dir(tmp_path / "moe", data_tokenizer, **overrides)
    out = tmp_path / "hf"
    assert export_cli.main(["--model", str(moe), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and field in err and "no GraniteMoeShared equivalent" in err
    assert not out.exists()


def test_export_names_a_missing_model_directory(tmp_path, capsys):
    assert export_cli.main(["--model", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "nope" in capsys.readouterr().err


def _edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, field", [
    (lambda d: _edit_config(d, attention_bias=True), "attention_bias"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act"),
    (lambda d: _edit_config(d, num_local_experts=8), "num_local_experts"),
    (lambda d: _edit_config(d, model_type="mixtral"), "model_type"),
    (lambda d: _edit_config(d, head_dim=8), "head_dim"),
    (lambda d: (d / "tokenizer.model").unlink(), "sentencepiece"),
    (lambda d: (d / SAFETENSORS_FILE).unlink(), "safetensors"),
])
def test_import_refuses_what_minigpt_cannot_run_exactly_in_one_line_naming_it(tied_hf_dir, tmp_path, capsys, edit, field):
    foreign = tmp_path / "foreign"
    shutil.copytree(tied_hf_dir, foreign)
    edit(foreign)
    assert generate_cli.main(["--model", str(foreign), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and field in err and "\n" not in err, err


def test_import_refuses_biases_and_an_untied_head_where_the_config_ties(tied_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from minigpt.interop.hf_llama import InteropError, load_hf_llama

    foreign = tmp_path / "foreign"
    shutil.copytree(tied_hf_dir, foreign)
    tensors = load_file(str(foreign / SAFETENSORS_FILE))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(4)
    save_file(tensors, str(foreign / SAFETENSORS_FILE), metadata={"format": "pt"})
    with pytest.raises(InteropError, match="q_proj.bias.*biases are not supported"):
        load_hf_llama(foreign)
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    _edit_config(foreign, tie_word_embeddings=True)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(foreign / SAFETENSORS_FILE), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="ties embeddings but lm_head.weight differs"):
        load_hf_llama(foreign)


def test_import_refuses_a_foreign_sentencepiece_vocabulary(tied_hf_dir, tmp_path):
    """A stock Llama vocabulary numbers <unk>/<s>/</s> 0/1/2; MiniGPT's ids are fixed otherwise."""
    import sentencepiece as spm

    from minigpt.interop.hf_llama import InteropError, load_hf_llama

    foreign = tmp_path / "foreign"
    shutil.copytree(tied_hf_dir, foreign)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=30, model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    shutil.copyfile(tmp_path / "sp.model", foreign / "tokenizer.model")
    with pytest.raises(InteropError, match="special token <unk> has id 0, MiniGPT expects 1"):
        load_hf_llama(foreign)


# --- GGUF --------------------------------------------------------------------------------------------

gguf_reason = "the GGUF export needs the gguf package (pip install -e '.[hf]')"


def llama_cpp_reference_logits(tensors: dict[str, np.ndarray], meta: dict, ids: list[int]) -> np.ndarray:
    """Logits of llama.cpp's `llama` graph, written out in numpy from the GGUF tensors and metadata:
    RMSNorm, RoPE rotating *adjacent* pairs (llama.cpp's normal mode), GQA causal attention, SwiGLU."""
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    x = tensors["token_embd.weight"][ids].astype(np.float64)
    t, width = x.shape
    d = width // heads
    angles = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # v (T, H, D): rotate (v[2i], v[2i+1]) by angle i
        even, odd = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = even * cos[:, None] - odd * sin[:, None]
        out[..., 1::2] = even * sin[:, None] + odd * cos[:, None]
        return out

    for i in range(meta["llama.block_count"]):
        w = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm.weight"])
        q = rope((h @ w["attn_q.weight"].T).reshape(t, heads, d))
        k = rope((h @ w["attn_k.weight"].T).reshape(t, kv_heads, d)).repeat(heads // kv_heads, axis=1)
        v = (h @ w["attn_v.weight"].T).reshape(t, kv_heads, d).repeat(heads // kv_heads, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(t, width) @ w["attn_output.weight"].T
        h = norm(x, w["ffn_norm.weight"])
        gate = h @ w["ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T
    x = norm(x, tensors["output_norm.weight"])
    return x @ tensors.get("output.weight", tensors["token_embd.weight"]).T


def test_gguf_file_reads_back_with_llama_metadata_vocabulary_and_equal_tensors(model_dir, tmp_path):
    pytest.importorskip("gguf", reason=gguf_reason)
    from minigpt.interop.gguf_llama import export_gguf, gguf_tensors, read_gguf

    out = export_gguf(model_dir, tmp_path / "model.gguf")
    meta, tensors = read_gguf(out)
    model, tokenizer = load_consolidated(model_dir)
    config = model.config
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count_kv"]) == (
        config.num_layers, config.hidden_size, config.num_kv_heads)
    assert meta["tokenizer.ggml.tokens"][:tokenizer.vocab_size] == [
        tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert np.allclose(meta["tokenizer.ggml.scores"][:tokenizer.vocab_size],
                       [tokenizer.sp.get_score(i) for i in range(tokenizer.vocab_size)])
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.im_end_id] == 3 and types[tokenizer.sp.piece_to_id("<0x0A>")] == 6  # control, byte
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id
    expected = gguf_tensors(model.state_dict(), config)
    assert list(tensors) == list(expected)
    for name, tensor in expected.items():
        assert np.array_equal(tensors[name], tensor.numpy()), name
    assert ("output.weight" in tensors) == (not config.tie_embeddings)


def test_gguf_tensors_run_through_llama_cpps_graph_give_our_logits(model_dir, tmp_path):
    """Checks the q/k permutation: llama.cpp's interleaved RoPE on the permuted weights equals our
    rotate-half RoPE on ours."""
    pytest.importorskip("gguf", reason=gguf_reason)
    from minigpt.interop.gguf_llama import export_gguf, read_gguf

    meta, tensors = read_gguf(export_gguf(model_dir, tmp_path / "model.gguf"))
    model, _ = load_consolidated(model_dir)
    ids = [5, 17, 99, 3, 42, 8, 250, 11, 64, 7]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    assert np.abs(llama_cpp_reference_logits(tensors, meta, ids) - ours).max() <= 1e-4


@pytest.mark.parametrize("dtype, numpy_dtype", [("fp16", np.float16), ("bf16", None)])
def test_gguf_half_precision_stores_rounded_matrices_and_f32_norms(tied_dir, tmp_path, dtype, numpy_dtype):
    pytest.importorskip("gguf", reason=gguf_reason)
    from minigpt.interop.gguf_llama import export_gguf, read_gguf

    meta, tensors = read_gguf(export_gguf(tied_dir, tmp_path / "model.gguf", dtype=dtype))
    model, _ = load_consolidated(tied_dir)
    embed = model.embed.weight.detach()
    rounded = embed.to(torch.bfloat16).float() if numpy_dtype is None else embed.to(torch.float16).float()
    assert np.array_equal(tensors["token_embd.weight"], rounded.numpy())
    assert np.array_equal(tensors["output_norm.weight"], model.norm.weight.detach().numpy())
    assert meta["general.file_type"] == {"fp16": 1, "bf16": 32}[dtype]


def test_gguf_cli_refuses_an_existing_file_and_writes_it_with_force(tied_dir, tmp_path, capsys):
    pytest.importorskip("gguf", reason=gguf_reason)
    out = tmp_path / "m.gguf"
    out.write_text("old")
    assert export_cli.main(["--model", str(tied_dir), "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "old"
    assert export_cli.main(["--model", str(tied_dir), "--format", "gguf", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.integration
def test_training_continues_from_an_hf_directory(tied_dir, tied_hf_dir, shards, tmp_path):
    """--init-from with a Hugging Face directory: the real Trainer converts it once and pretrains on."""
    from minigpt.signals import EXIT_FINISHED
    from minigpt.train.loop import Trainer

    cfg = TrainConfig.of(mode="pretrain", init_from=str(tied_hf_dir), data=[str(shards)], out=str(tmp_path / "run"),
                      seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, eval_interval=0, save_interval=0,
                      log_interval=100, sample_prompt="")
    assert Trainer(cfg).run() == EXIT_FINISHED
    snapshot = json.loads((tmp_path / "run" / "training_config_snapshot.json").read_text())
    assert snapshot["weights_from"] == str(tied_hf_dir)
    trained, _ = load_consolidated(tmp_path / "run" / "final")
    start, _ = load_consolidated(tied_dir)
    assert trained.config == start.config
    assert not torch.equal(trained.embed.weight, start.embed.weight)  # it trained


def test_the_core_and_the_interop_modules_import_no_optional_package_until_used():
    code = ("import sys, minigpt.generate, minigpt.train.loop, minigpt.cli.export, minigpt.interop.gguf_llama; "
            "print(sorted({'safetensors', 'gguf', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_exported_weights_have_the_mode_of_their_sibling_files(tied_dir, tmp_path):
    out = export_hf(tied_dir, tmp_path / "hf")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes[SAFETENSORS_FILE] == modes["config.json"] == 0o666 & ~current_umask(), modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("export_format", ["hf", "gguf"])
def test_an_export_sweeps_what_an_interrupted_export_left_and_nothing_else(tied_dir, tmp_path, export_format):
    if export_format == "gguf":
        pytest.importorskip("gguf", reason="the GGUF export needs the gguf package")
    out = tmp_path / ("model.gguf" if export_format == "gguf" else "hf")
    export_cli.main(["--model", str(tied_dir), "--format", export_format, "--out", str(out)])
    crashed = [tmp_path / f".{out.name}.tmp-1a2b3c4d", tmp_path / f".{out.name}.old-5e6f7a8b"]
    for path in crashed:  # a staging folder, and the previous export a --force run had put aside
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    users = [tmp_path / f".{out.name}.tmp-notours", tmp_path / f"{out.name}.tmp-1a2b3c4d",
             tmp_path / "notes.txt"]
    for path in users:
        path.write_text("the user's")
    args = ["--model", str(tied_dir), "--format", export_format, "--out", str(out)]
    code = export_cli.main([*args, "--force"])
    assert code == 0
    assert not any(path.exists() for path in crashed)
    assert all(path.read_text() == "the user's" for path in users)


def test_a_previous_export_put_aside_by_a_crashed_run_is_put_back(tied_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    export_hf(tied_dir, out)
    aside = tmp_path / ".hf.old-0badc0de"
    out.rename(aside)  # a --force export that died between its two renames
    code = export_cli.main(["--model", str(tied_dir), "--format", "hf", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (out / SAFETENSORS_FILE).is_file() and not aside.exists()
