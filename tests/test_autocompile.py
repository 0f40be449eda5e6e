"""--compile auto: the decision from facts fixed before the first step, where it is skipped, and the flag's forms."""

from __future__ import annotations

import pytest
import torch

from minigpt.cli.train import build_parser
from minigpt.config import ConfigError, TrainConfig
from minigpt.train.autocompile import MIN_SECONDS, MIN_STEPS, compile_pays, compile_unavailable

CPU = torch.device("cpu")


def test_a_long_fp32_run_compiles_and_every_decision_says_why():
    pays, why = compile_pays(CPU, "fp32", MIN_STEPS, None)
    assert pays and f"{MIN_STEPS:,} steps" in why
    pays, why = compile_pays(CPU, "fp32", MIN_STEPS, 3600.0)
    assert pays and "3600 s budget" in why


@pytest.mark.parametrize("precision, steps, budget, reason", [
    ("fp32", MIN_STEPS - 1, None, "too few to pay back"),
    ("fp32", 100_000, MIN_SECONDS - 1, "too short to pay back"),    # the quality recipe: 122 s of a huge max
    ("bf16", 100_000, None, "bf16 steps on the CPU"),
])
def test_a_run_that_would_not_pay_back_stays_eager(precision, steps, budget, reason):
    pays, why = compile_pays(CPU, precision, steps, budget)
    assert not pays and reason in why


def test_the_decision_reads_no_clock(monkeypatch):
    """Nothing timed goes in: the same facts give the same decision however slow the machine is."""
    monkeypatch.setattr("time.perf_counter", lambda: pytest.fail("compile_pays read the clock"))
    monkeypatch.setattr("time.monotonic", lambda: pytest.fail("compile_pays read the clock"))
    assert compile_pays(CPU, "fp32", 10_000, None)[0]


@pytest.mark.parametrize("options, reason", [
    (dict(plain_engine=False), "DeepSpeed"),
    (dict(moe=True), "mixture-of-experts"),
    (dict(activation_checkpointing=True), "--activation-checkpointing"),
    (dict(mode="dpo"), "--mode dpo"),
])
def test_where_it_cannot_work_it_is_skipped_with_the_reason(options, reason):
    settings = {**dict(plain_engine=True, moe=False, activation_checkpointing=False, mode="pretrain"), **options}
    assert reason in compile_unavailable(torch.device("cpu"), **settings)


def test_a_cpu_without_a_cpp_compiler_is_skipped(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    why = compile_unavailable(torch.device("cpu"), plain_engine=True, moe=False, activation_checkpointing=False,
                              mode="sft")
    assert "C++ compiler" in why


def test_flag_forms():
    parser = build_parser()
    assert parser.parse_args([]).compile == "auto"
    assert parser.parse_args(["--compile"]).compile == "on"
    assert parser.parse_args(["--compile", "off"]).compile == "off"
    assert parser.parse_args(["--compile", "--batch-size", "4"]).compile == "on"
    with pytest.raises(ConfigError, match="--compile must be one of"):
        TrainConfig.of(compile="sometimes")


@pytest.mark.integration
def test_a_real_run_compiles_from_its_first_step_and_a_resume_follows(tmp_path, shards, data_tokenizer, monkeypatch,
                                                                        capsys):
    """The real torch.compile (inductor, C++ on this CPU) inside the training loop, with the step threshold
    lowered so a short run qualifies: the decision is printed, the run finishes compiled, and a resumed run
    follows the recorded decision."""
    from minigpt.signals import EXIT_FINISHED
    from minigpt.train.loop import Trainer

    monkeypatch.setattr("minigpt.train.autocompile.MIN_STEPS", 4)
    cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(tmp_path),
                      out=str(tmp_path / "run"), tokenizer=str(data_tokenizer.directory), seq_len=48, batch_size=4,
                      max_steps=6, warmup_steps=2, eval_interval=0, eval_batches=2, save_interval=0,
                      sample_prompt="a", precision="fp32")
    trainer = Trainer(cfg)
    assert trainer.run() == EXIT_FINISHED
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("--compile auto:"))
    assert line == "--compile auto: compiled (6 steps pay back a compilation)", line
    assert trainer.engine.compiled
    assert (tmp_path / "run" / "final" / "model.pt").is_file()

    monkeypatch.setattr("minigpt.train.autocompile.MIN_STEPS", 10_000)  # would now say eager
    resumed = Trainer(cfg.replace(max_steps=cfg.schedule.max_steps + 2, auto_resume=True))
    assert resumed.run() == EXIT_FINISHED
    out = capsys.readouterr().out
    assert "--compile auto: compiled, as the run decided before its checkpoint" in out, out[-2000:]
    assert resumed.engine.compiled
