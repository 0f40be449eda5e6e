"""A mode is its objective class plus one registry entry: a toy mode defined in this file alone trains,
resumes bitwise after an interruption and consolidates `final/`, with no other file touched.

This keeps docs/architecture.md's "where to add a mode" recipe literally true: if the loop, the config or
`--compile auto` needed a table entry for a new mode, the toy mode would fail here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from stop_request import StopAtStep

from minigpt.cli.args import train_config_from_args
from minigpt.config import PRESETS, ConfigError, TrainConfig, check_interval, option
from minigpt.data.datasets import PretrainWindows
from minigpt.metrics import MetricSums
from minigpt.modes import mode_names, objective_class, register_objective, registered_objective
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.train.autocompile import compile_unavailable
from minigpt.train.loop import NO_PREVIOUS_STAGE, Trainer, find_starting_weights, no_previous_stage_warning
from minigpt.train.objective import Objective
from minigpt.weights import load_consolidated

STEPS, STOP_AT = 4, 2
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)


@dataclass
class ToyOptions:
    """The toy mode's own flag: which share of each window is scored."""

    toy_scored_share: float = option("toy: share of each window, from its end, the loss is computed on",
                                     default=0.5)

    def __post_init__(self) -> None:
        check_interval(self, "toy_scored_share", 0, 1)


class SecondHalfLanguageModeling(Objective):
    """Toy mode: next-token loss on the last part of each pretraining window only (the positions that see
    the most context; half of it by default). Everything the loop asks about the mode is a class attribute,
    its own flags included."""

    dataset_kind = "pretrain"
    options = ToyOptions
    previous_stages = ()
    chat_samples = False
    varying_shapes = False
    eval_sums = ("loss_sum", "tokens")

    def __init__(self, scored_share: float = 0.5):
        self.scored_share = scored_share

    @classmethod
    def from_options(cls, options: ToyOptions, tokenizer) -> SecondHalfLanguageModeling:
        return cls(options.toy_scored_share)

    def dataset(self, reader, seq_len: int, tokenizer):
        return PretrainWindows(reader, seq_len)

    def second_half_losses(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"])
        half = logits.shape[1] - round(logits.shape[1] * self.scored_share)
        return F.cross_entropy(logits[:, half:].float().flatten(0, 1), batch["labels"][:, half:].flatten(),
                               reduction="none")

    def loss(self, engine, batch):
        return self.second_half_losses(engine, batch).mean(), {}

    @torch.no_grad()
    def eval_batch(self, model, batch, sums: MetricSums) -> None:
        losses = self.second_half_losses(model, batch)
        sums.add("loss_sum", losses.double().sum().item())
        sums.add("tokens", losses.numel())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"val_loss": sums["loss_sum"] / max(sums["tokens"], 1.0)}


class ToyPostTraining(SecondHalfLanguageModeling):
    """Toy post-training mode: starts from the toy mode's final weights, answers as a chat, varying shapes."""

    previous_stages = ("toy",)
    chat_samples = True
    varying_shapes = True


@pytest.fixture
def toy_modes(monkeypatch):
    """The toy modes registered for one test only: no other test sees them."""
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    with registered_objective("toy", SecondHalfLanguageModeling), registered_objective("toy-post", ToyPostTraining):
        yield
    assert "toy" not in mode_names() and "toy-post" not in mode_names()


def rows(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == split]


def toy_config(out: Path, shards: Path, data_tokenizer, **options) -> TrainConfig:
    return TrainConfig.of(mode="toy", config="tiny", data=[str(shards)], data_dir=str(out.parent), out=str(out),
                       tokenizer=str(data_tokenizer.directory), seq_len=48, batch_size=4, max_steps=STEPS,
                       warmup_steps=1, eval_interval=2, eval_batches=2, save_interval=0, log_interval=100,
                       sample_prompt="a", **options)


def test_a_mode_registered_from_a_test_file_trains_resumes_bitwise_and_consolidates(
        toy_modes, tmp_path, shards, data_tokenizer):
    whole = tmp_path / "whole"
    assert Trainer(toy_config(whole, shards, data_tokenizer)).run() == EXIT_FINISHED

    interrupted = tmp_path / "interrupted"
    trainer = Trainer(toy_config(interrupted, shards, data_tokenizer))
    assert trainer.run(StopAtStep(trainer, STOP_AT)) == EXIT_PREEMPTED
    assert (interrupted / "ckpt" / f"step_{STOP_AT:07d}" / "manifest.json").is_file()
    assert not (interrupted / "final").exists()
    assert Trainer(toy_config(interrupted, shards, data_tokenizer, auto_resume=True)).run() == EXIT_FINISHED

    train = rows(whole, "train")
    assert [r["step"] for r in train] == list(range(STEPS))
    assert all(r["loss"] == r["loss"] for r in train)  # finite, not NaN
    assert [(r["step"], r["loss"]) for r in rows(interrupted, "train")] == [(r["step"], r["loss"]) for r in train]
    assert rows(interrupted, "val")[-1]["val_loss"] == rows(whole, "val")[-1]["val_loss"]

    model, tokenizer = load_consolidated(whole / "final")
    resumed_model, _ = load_consolidated(interrupted / "final")
    assert tokenizer is not None and tokenizer.checksum == data_tokenizer.checksum
    assert model.state_dict().keys() == resumed_model.state_dict().keys()
    assert all(torch.equal(value, resumed_model.state_dict()[name]) for name, value in model.state_dict().items())
    meta = json.loads((whole / "training_config_snapshot.json").read_text())
    assert meta["train"]["mode"] == "toy" and meta["weights_from"] == "random init"
    assert meta["train"]["toy"] == {"toy_scored_share": 0.5}  # the mode's own options, grouped under its name


def test_a_registered_mode_brings_its_own_flags_to_the_command_line(toy_modes, tmp_path, shards, data_tokenizer):
    from minigpt.cli.train import build_parser

    parser = build_parser()
    assert "--toy-scored-share" in parser.format_help()
    cfg = train_config_from_args(parser.parse_args(["--mode", "toy", "--toy-scored-share", "0.25"]))
    assert cfg.options == ToyOptions(0.25)
    with pytest.raises(ConfigError, match=r"--toy-scored-share must be in \[0, 1\], got 2"):
        train_config_from_args(parser.parse_args(["--mode", "toy", "--toy-scored-share", "2"]))
    ignored = train_config_from_args(parser.parse_args(["--toy-scored-share", "0.25"]))  # one list for a chain
    assert ignored.warnings() == ["--toy-scored-share applies to --mode toy, toy-post, not to --mode pretrain: ignored"]
    # The option reaches the objective: scoring a quarter of each window trains differently from half.
    quarter = tmp_path / "quarter"
    assert Trainer(toy_config(quarter, shards, data_tokenizer, toy_scored_share=0.25)).run() == EXIT_FINISHED
    half = tmp_path / "half"
    assert Trainer(toy_config(half, shards, data_tokenizer)).run() == EXIT_FINISHED
    assert rows(quarter, "train")[0]["loss"] != rows(half, "train")[0]["loss"]


def test_a_registered_mode_is_accepted_by_the_config_only_while_registered(toy_modes):
    assert mode_names()[:5] == ("pretrain", "sft", "dpo", "reward", "rlhf")
    assert {"toy", "toy-post"} <= set(mode_names())
    assert TrainConfig.of(mode="toy").mode == "toy"
    with pytest.raises(ValueError, match="already registered"):
        register_objective("toy", SecondHalfLanguageModeling)
    with pytest.raises(ConfigError, match="--mode must be one of"):
        TrainConfig.of(mode="toy-unknown")


def test_the_loop_reads_previous_stages_chat_and_shapes_from_the_class(toy_modes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.of(mode="toy-post", config="tiny")
    assert find_starting_weights(cfg).source == NO_PREVIOUS_STAGE  # no KeyError for a mode no table knows
    assert "--mode toy-post found no previous stage (checkpoints/{toy}_tiny" in no_previous_stage_warning(cfg)
    final = tmp_path / "checkpoints" / "toy_tiny" / "final"
    final.mkdir(parents=True)
    (final / "model.pt").write_bytes(b"")
    assert find_starting_weights(cfg).model_dir == Path("checkpoints/toy_tiny/final")
    assert find_starting_weights(TrainConfig.of(mode="toy", config="tiny")).source == "random init"

    def why_not(mode: str) -> str | None:
        return compile_unavailable(torch.device("cpu"), plain_engine=True, moe=False, activation_checkpointing=False,
                                   mode=mode)

    assert why_not("toy-post") == "--mode toy-post batches change shape from step to step"
    assert why_not("toy") in (None, why_not("pretrain"))  # shapes fixed: no mode-specific reason
    assert objective_class("toy-post").chat_samples and not objective_class("toy").chat_samples


def test_a_mode_whose_dataset_kind_no_shard_has_is_refused():
    class Unknown(SecondHalfLanguageModeling):
        dataset_kind = "audio"

    with pytest.raises(ValueError, match="dataset_kind 'audio' is not one of"):
        register_objective("toy-audio", Unknown)
    assert "toy-audio" not in mode_names()


def test_the_mode_help_names_every_built_in_mode_and_listing_modes_imports_no_torch():
    help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "mode").metadata["help"]
    assert [mode for mode in mode_names() if mode not in help_text] == []
    probe = ("import sys; import minigpt.config; from minigpt.modes import mode_names; "
             "print(len(mode_names()), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(len(mode_names())), "False"]
