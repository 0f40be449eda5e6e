"""The consolidated weights directory: bitwise round trip, atomic replace, and clear refusals."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from model_factory import seeded_model, small_test_config
from spm_fixture import build_tokenizer

from minigpt import weights
from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.model import MiniGPT
from minigpt.tokenizer import TokenizerError
from minigpt.weights import CONFIG_FILE, WEIGHTS_FILE, WeightsError, load_consolidated, save_consolidated


def make_config(**overrides) -> MiniGPTConfig:
    return small_test_config(**{"vocab_size": 400, **overrides})


def make_model(seed: int = 0, **overrides) -> MiniGPT:
    return seeded_model(make_config(**overrides), seed)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def saved(tmp_path, tokenizer_dir) -> tuple[Path, MiniGPT]:
    model = make_model()
    return save_consolidated(tmp_path / "model", model.state_dict(), model.config, tokenizer_dir), model


def edit_config_json(model_dir: Path, edit) -> None:
    path = model_dir / CONFIG_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_load_round_trips_every_tensor_bitwise(tmp_path, tokenizer_dir, tie):
    model = make_model(tie_embeddings=tie)
    out = save_consolidated(tmp_path / "model", model.state_dict(), model.config, tokenizer_dir,
                            extra={"step": 7, "mode": "pretrain"})
    loaded, tokenizer = load_consolidated(out)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == torch.float32
        assert torch.equal(restored[name], tensor), name
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    ids = torch.randint(0, 384, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    assert tokenizer is not None and tokenizer.encode("hear me") == tokenizer.encode("hear me")
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["tokenizer_checksum"] == tokenizer.checksum and meta["extra"] == {"step": 7, "mode": "pretrain"}


def test_model_file_is_a_plain_fp32_state_dict_loadable_weights_only(saved):
    model_dir, model = saved
    state = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())


def test_bf16_and_wrapped_state_dicts_are_saved_as_plain_fp32(tmp_path):
    model = make_model()
    wrapped = {f"module.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    out = save_consolidated(tmp_path / "model", wrapped, model.config, tokenizer_dir=None)
    loaded, tokenizer = load_consolidated(out)
    assert tokenizer is None
    assert torch.equal(loaded.embed.weight, model.embed.weight.to(torch.bfloat16).float())


def test_tied_weights_load_when_lm_head_was_left_out(saved):
    model_dir, model = saved
    state = model.state_dict()
    del state["lm_head.weight"]
    torch.save(state, model_dir / WEIGHTS_FILE)
    loaded, _ = load_consolidated(model_dir)
    assert torch.equal(loaded.lm_head.weight, model.embed.weight)


def test_saving_again_replaces_the_directory_and_leaves_no_temporary_files(saved, tokenizer_dir):
    model_dir, _ = saved
    newer = make_model(seed=1)
    save_consolidated(model_dir, newer.state_dict(), newer.config, tokenizer_dir, extra={"step": 2})
    loaded, _ = load_consolidated(model_dir)
    assert torch.equal(loaded.embed.weight, newer.embed.weight)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


def test_a_failed_save_leaves_the_previous_directory_intact(saved, tokenizer_dir):
    model_dir, model = saved
    wrong = make_model(vocab_size=512)
    with pytest.raises(WeightsError):
        save_consolidated(model_dir, wrong.state_dict(), model.config, tokenizer_dir)
    loaded, _ = load_consolidated(model_dir)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, "tokenizer.model", "tokenizer.json"])
def test_a_missing_file_is_named(saved, name):
    model_dir, _ = saved
    (model_dir / name).unlink()
    with pytest.raises(WeightsError, match=f"{name}: missing"):
        load_consolidated(model_dir)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(WeightsError, match="model directory not found: .*nowhere"):
        load_consolidated(tmp_path / "nowhere")


def test_weights_for_another_vocabulary_name_the_tensor_and_both_shapes(saved):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta["model"].update(vocab_size=512))
    with pytest.raises(WeightsError, match=r"embed.weight has shape \(400, 64\), the config expects \(512, 64\)"):
        load_consolidated(model_dir)


def test_weights_for_another_model_shape_are_refused(saved):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta["model"].update(num_layers=3))
    with pytest.raises(WeightsError, match=r"model.pt: holds 2 transformer blocks, the config's num_layers is 3"):
        load_consolidated(model_dir)
    edit_config_json(model_dir, lambda meta: meta["model"].update(num_layers=2, ffn_hidden_size=96))
    with pytest.raises(WeightsError, match=r"blocks.0.ffn.gate_up_proj.weight has shape \(256, 64\).*\(192, 64\)"):
        load_consolidated(model_dir)


@pytest.mark.parametrize("edit, message", [
    (dict(num_layers=10**9), r"config.json: MiniGPTConfig.num_layers must be at most"),
    (dict(num_layers=1000), r"model.pt: holds 2 transformer blocks, the config's num_layers is 1000"),
    (dict(hidden_size=8192, num_heads=4, num_kv_heads=4),
     r"model.pt: tensor embed.weight has shape \(400, 64\), the config expects \(400, 8192\): its hidden_size"),
], ids=["out_of_range", "more_layers_than_the_weights", "wider_than_the_weights"])
def test_a_bogus_config_json_is_named_before_any_model_is_built(saved, monkeypatch, edit, message):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta["model"].update(**edit))

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was built for a config that does not match the weights")

    monkeypatch.setattr(weights, "expected_shapes", no_model)
    monkeypatch.setattr(weights, "MiniGPT", no_model)
    with pytest.raises((ConfigError, WeightsError), match=message):
        load_consolidated(model_dir)


def test_a_config_that_cannot_build_a_model_names_the_field_and_file(saved):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta["model"].update(num_heads=3))
    with pytest.raises(ConfigError, match=r"config.json: MiniGPTConfig.num_heads=3 does not divide hidden_size=64"):
        load_consolidated(model_dir)
    edit_config_json(model_dir, lambda meta: meta["model"].update(num_heads=4, hidden_dim=64))
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['hidden_dim'\]"):
        load_consolidated(model_dir)


def test_a_tokenizer_other_than_the_recorded_one_is_refused(saved):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta.update(tokenizer_checksum="0" * 64))
    with pytest.raises(WeightsError, match="tokenizer.model: checksum .* does not match .*config.json"):
        load_consolidated(model_dir)


def test_a_tokenizer_modified_after_saving_is_refused(saved):
    model_dir, _ = saved
    with open(model_dir / "tokenizer.model", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(TokenizerError, match="tokenizer.model: checksum"):
        load_consolidated(model_dir)


def test_a_foreign_config_json_or_corrupt_weights_are_named(saved):
    model_dir, _ = saved
    (model_dir / WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="model.pt: damaged or not a torch file"):
        load_consolidated(model_dir)
    (model_dir / CONFIG_FILE).write_text(json.dumps(make_config().to_dict()))
    with pytest.raises(WeightsError, match="config.json: not a MiniGPT consolidated config"):
        load_consolidated(model_dir)


@pytest.mark.parametrize("version", [2, None, "1"])
def test_weights_of_another_format_version_are_refused_by_name_and_kept(saved, version):
    model_dir, _ = saved
    edit_config_json(model_dir, lambda meta: meta.update(format_version=version) if version is not None
                     else meta.pop("format_version"))
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    with pytest.raises(WeightsError) as refused:
        load_consolidated(model_dir.parent / "model")
    assert str(refused.value) == (f"{model_dir / CONFIG_FILE}: format_version {version!r}; this MiniGPT reads "
                                  f"version {weights.FORMAT_VERSION}")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_consolidated_directory_gets_the_permissions_of_an_ordinary_mkdir(tmp_path, tokenizer_dir):
    model = make_model()
    old = os.umask(0o027)
    try:
        out = save_consolidated(tmp_path / "model", model.state_dict(), model.config, tokenizer_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_a_pickled_model_file_is_refused_as_code_with_a_conversion_and_without_torchs_advice(saved, capsys):
    """A model.pt holding a pickled object (here argparse.Namespace) is refused; the message says why, how
    to convert a file one trusts (allowing only the class it names), and never to disable weights-only loading."""
    import argparse

    from minigpt.cli.generate import main

    model_dir, model = saved
    torch.save({**model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, model_dir / WEIGHTS_FILE)
    assert main(["--model", str(model_dir), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert f"{model_dir / WEIGHTS_FILE}: refused to load" in error and "could run code" in error
    assert "argparse.Namespace" in error and "add_safe_globals([argparse.Namespace])" in error
    assert "weights_only" not in error and "two options" not in error, error


@pytest.mark.parametrize(("edit", "says"), [
    (lambda meta: meta["model"].update(max_seq_len=1 << 20), "max_seq_len must be at most 65,536"),
    (lambda meta: meta["model"].update(num_layers="2"), "num_layers must be a positive integer"),
    (lambda meta: meta.update(tokenizer_checksum=5), "tokenizer_checksum must be a string or null"),
    (lambda meta: meta.update(extra=[]), "extra must be an object"),
])
def test_a_config_json_with_a_field_out_of_bounds_is_refused_naming_file_and_field(saved, edit, says):
    model_dir, _model = saved
    edit_config_json(model_dir, edit)
    with pytest.raises((ConfigError, WeightsError), match=f"{model_dir / CONFIG_FILE}: .*{says}"):
        load_consolidated(model_dir)


@pytest.mark.parametrize("text", ['{"format": "minigpt-consolidated", "model": {"rope_theta": NaN}}',
                                  "[" * 100_000 + "]" * 100_000, " " * (2 << 20)],
                         ids=["NaN", "nested", "huge"])
def test_a_damaged_config_json_is_one_error_naming_it(saved, text):
    model_dir, _model = saved
    (model_dir / CONFIG_FILE).write_text(text)
    with pytest.raises(WeightsError, match=str(model_dir / CONFIG_FILE)):
        load_consolidated(model_dir)
