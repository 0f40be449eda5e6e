"""build_ds_config: DeepSpeed's JSON holds ZeRO settings; batch sizes, clipping and precision come from
the training config, and a contradiction is an error naming file, field and both values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.config import ConfigError, TrainConfig
from minigpt.engine.ds_config import (
    DEEPSPEED_TOP_LEVEL_KEYS,
    build_ds_config,
    load_ds_json,
    offloads_optimizer,
    zero_stage_of,
)

REPO = Path(__file__).resolve().parents[1]
SOURCE = "ds_configs/zero2.json"


def cfg(**overrides) -> TrainConfig:
    return TrainConfig.of(**{"batch_size": 4, "grad_accum": 3, "grad_clip": 1.0, "precision": "fp32", **overrides})


def sections(**overrides) -> tuple:
    """The engine and optimisation sections `build_ds_config` reads."""
    config = cfg(**overrides)
    return config.engine, config.optim


def test_batch_sizes_and_clipping_are_filled_from_the_training_config():
    ds = build_ds_config({"zero_optimization": {"stage": 2}}, *sections(), world_size=2, source=SOURCE, accelerator="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}


def test_the_raw_dict_is_not_modified():
    raw = {"zero_optimization": {"stage": 1}}
    build_ds_config(raw, *sections(), 1, SOURCE, accelerator="cpu")
    assert raw == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_train_batch_size_scales_with_world_size(world_size):
    ds = build_ds_config({}, *sections(batch_size=2, grad_accum=5), world_size, SOURCE, accelerator="cpu")
    assert ds["train_batch_size"] == 2 * 5 * world_size


@pytest.mark.parametrize("field, value, flag", [
    ("train_micro_batch_size_per_gpu", 8, "--batch-size"),
    ("gradient_accumulation_steps", 1, "--grad-accum"),
    ("train_batch_size", 12, "world size 2"),
    ("gradient_clipping", 0.5, "--grad-clip"),
])
def test_a_contradicting_json_field_names_file_field_and_both_values(field, value, flag):
    with pytest.raises(ConfigError) as err:
        build_ds_config({field: value}, *sections(), 2, SOURCE, accelerator="cpu")
    message = str(err.value)
    assert SOURCE in message and field in message and repr(value) in message and flag in message


def test_agreeing_json_fields_are_accepted():
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "train_batch_size": 24,
           "gradient_clipping": 1.0}
    ds = build_ds_config(raw, *sections(), 2, SOURCE, accelerator="cpu")
    assert ds["train_batch_size"] == 24


def test_precision_comes_from_the_training_config():
    ds = build_ds_config({}, *sections(precision="bf16"), 2, SOURCE, accelerator="cpu")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    ds = build_ds_config({"fp16": {"loss_scale_window": 100}}, *sections(precision="fp16"), 2, SOURCE, accelerator="cuda")
    assert ds["fp16"] == {"loss_scale_window": 100, "enabled": True}


def test_json_precision_contradicting_the_training_config_is_refused():
    with pytest.raises(ConfigError, match=r"bf16.enabled=True contradicts .*--precision fp32"):
        build_ds_config({"bf16": {"enabled": True}}, *sections(precision="fp32"), 2, SOURCE, accelerator="cpu")


def test_fp16_on_the_cpu_accelerator_is_a_clear_error():
    with pytest.raises(ConfigError, match="fp16.*CPU accelerator.*bf16"):
        build_ds_config({}, *sections(precision="fp16"), 2, SOURCE, precision="fp16", accelerator="cpu")
    with pytest.raises(ConfigError, match="fp16.*CPU accelerator.*bf16"):
        build_ds_config({}, *sections(precision="fp16"), 2, SOURCE, accelerator="cpu")


def test_auto_precision_on_cpu_is_fp32():
    ds = build_ds_config({}, *sections(precision="auto"), 1, SOURCE, accelerator="cpu")
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_are_refused(section):
    with pytest.raises(ConfigError, match=f"{SOURCE}: has a '{section}' section"):
        build_ds_config({section: {"type": "AdamW"}}, *sections(), 1, SOURCE, accelerator="cpu")


def test_unknown_zero_stage_and_offload_without_zero_are_refused():
    with pytest.raises(ConfigError, match="stage=4"):
        build_ds_config({"zero_optimization": {"stage": 4}}, *sections(), 1, SOURCE, accelerator="cpu")
    raw = {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        build_ds_config(raw, *sections(), 1, SOURCE, accelerator="cpu")


def test_client_optimizer_is_allowed_and_logging_is_quiet():
    ds = build_ds_config({"zero_optimization": {"stage": 3}}, *sections(), 2, SOURCE, accelerator="cpu")
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["steps_per_print"] >= 10**6


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_hold_only_deepspeed_settings_and_build(path):
    raw = load_ds_json(path)
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
    assert not owned & set(raw), f"{path.name} sets {owned & set(raw)}"
    ds = build_ds_config(raw, *sections(), 2, str(path), accelerator="cpu")
    assert ds["zero_optimization"]["stage"] == zero_stage_of(raw)
    assert offloads_optimizer(raw) == ("offload" in path.name)
    assert set(raw) <= set(DEEPSPEED_TOP_LEVEL_KEYS)


def test_json_errors_name_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: not valid JSON"):
        load_ds_json(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_ds_json(tmp_path / "list.json")


def test_a_misspelled_top_level_key_is_warned_with_the_closest_known_key(tmp_path, capsys):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimizaton": {"stage": 2}, "steps_per_print": 5, "my_notes": "x"}))
    raw = load_ds_json(path)
    assert raw["zero_optimizaton"] == {"stage": 2}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "typo.json: unknown top-level key 'my_notes'" in lines[0] and "did you mean" not in lines[0]
    assert "typo.json: unknown top-level key 'zero_optimizaton' (did you mean 'zero_optimization'?)" in lines[1]


def test_dry_run_shows_the_unknown_key_warning(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimizaton": {"stage": 2}}))
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--ds-config", str(path),
                             "--out", str(tmp_path / "run"), "--dry-run"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "unknown top-level key 'zero_optimizaton' (did you mean 'zero_optimization'?)" in result.stderr
    assert "configuration is valid" in result.stdout


@pytest.mark.integration
def test_known_top_level_keys_are_the_keys_deepspeed_reads():
    """Replay DeepSpeed's own config parsing on a dict that records every top-level key it looks up."""
    ds_config = pytest.importorskip("deepspeed.runtime.config", reason="checks the list against DeepSpeed")
    looked_up: set[str] = set()

    class RecordingDict(dict):
        def __contains__(self, key):
            looked_up.add(key)
            return super().__contains__(key)

        def get(self, key, default=None):
            looked_up.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def keys(self):
            return self  # `key in d.keys()` is recorded too

    parsed = object.__new__(ds_config.DeepSpeedConfig)
    parsed._initialize_params(RecordingDict(train_batch_size=1, train_micro_batch_size_per_gpu=1,
                                            gradient_accumulation_steps=1))
    read_elsewhere = {"vocabulary_size"}  # DeepSpeedConfig._do_warning_check
    assert looked_up | read_elsewhere == set(DEEPSPEED_TOP_LEVEL_KEYS)


def test_compile_on_is_refused_on_the_deepspeed_engine_rather_than_ignored():
    """The DeepSpeed engine runs eager: an explicit --compile on must not silently train uncompiled."""
    with pytest.raises(ConfigError, match=r"--compile on.*DeepSpeed engine.*--compile auto"):
        build_ds_config({}, *sections(compile="on"), 2, "zero2.json", precision="fp32", accelerator="cpu")
    for choice in ("auto", "off"):  # auto settles on eager there, and says so
        build_ds_config({}, *sections(compile=choice), 2, "zero2.json", precision="fp32", accelerator="cpu")
