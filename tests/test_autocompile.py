"""--compile auto: the decision from this run's own step times, where it is skipped, and the flag's forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minigpt.cli.train import build_parser
from minigpt.config import ConfigError, TrainConfig
from minigpt.train.autocompile import MEASURE, PAYBACK_SECONDS, CompileTrial, compile_unavailable


class Recorder:
    def __init__(self):
        self.switches: list[bool] = []
        self.reports: list[str] = []

    def trial(self) -> CompileTrial:
        return CompileTrial(self.switches.append, self.reports.append)


def run(trial: CompileTrial, eager: float, compile_s: float, compiled: float, steps_left: int = 10_000) -> list[bool]:
    """Feed step times the way the loop does; return which steps were flagged as the compilation."""
    flags = [trial.after_step(eager * 3, steps_left)]  # the warm-up step is slow and not counted
    flags += [trial.after_step(eager, steps_left) for _ in range(MEASURE)]
    if trial.phase == "compiling":
        flags.append(trial.after_step(compile_s, steps_left))
        flags += [trial.after_step(compiled, steps_left) for _ in range(MEASURE)]
    flags += [trial.after_step(compiled, steps_left) for _ in range(3)]
    return flags


def test_a_faster_compiled_step_is_kept_and_the_compile_step_is_flagged():
    rec = Recorder()
    trial = rec.trial()
    flags = run(trial, eager=0.10, compile_s=25.0, compiled=0.07)
    assert rec.switches == [True]
    assert trial.kept is True and trial.compile_seconds == 25.0
    assert flags.count(True) == 1 and flags[1 + MEASURE] is True
    assert "compiled in 25.0 s" in rec.reports[0] and "1.43x" in rec.reports[0]


def test_a_compiled_step_that_is_not_faster_goes_back_to_eager():
    rec = Recorder()
    trial = rec.trial()
    run(trial, eager=0.10, compile_s=25.0, compiled=0.098)
    assert rec.switches == [True, False]
    assert trial.kept is False
    assert "eager again" in rec.reports[0]


def test_a_run_too_short_to_pay_back_never_compiles():
    rec = Recorder()
    trial = rec.trial()
    steps_left = int(PAYBACK_SECONDS / 0.1) - 10
    flags = run(trial, eager=0.10, compile_s=25.0, compiled=0.05, steps_left=steps_left)
    assert rec.switches == [] and trial.kept is False and not any(flags)
    assert "too short to pay back" in rec.reports[0]


def test_the_time_budget_left_bounds_the_rest_of_the_run():
    rec = Recorder()
    trial = rec.trial()
    trial.after_step(0.3, 10_000, seconds_left=100.0)
    for _ in range(MEASURE):
        trial.after_step(0.1, 10_000, seconds_left=100.0)  # 1,000 s of steps, but 100 s of budget
    assert rec.switches == [] and "(100 s eager)" in rec.reports[0]


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
    assert TrainConfig(compile=True).compile == "on"  # the library's earlier boolean
    with pytest.raises(ConfigError, match="--compile must be one of"):
        TrainConfig(compile="sometimes")


@pytest.mark.integration
def test_a_real_run_compiles_times_both_and_reports(tmp_path, shards, data_tokenizer, monkeypatch, capsys):
    """The real torch.compile (inductor, C++ on this CPU) inside the training loop, payback threshold lowered
    so a short run tries it: the compile step is reported, and the run finishes on the engine it chose."""
    from minigpt.signals import EXIT_FINISHED
    from minigpt.train.loop import Trainer

    monkeypatch.setattr("minigpt.train.autocompile.PAYBACK_SECONDS", 0.0)
    cfg = TrainConfig(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(tmp_path),
                      out=str(tmp_path / "run"), tokenizer=str(data_tokenizer.directory), seq_len=48, batch_size=4,
                      max_steps=3 + 2 * MEASURE, warmup_steps=2, eval_interval=0, eval_batches=2, save_interval=0,
                      sample_prompt="a")
    trainer = Trainer(cfg)
    assert trainer.run() == EXIT_FINISHED
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("--compile auto:"))
    assert "compiled in" in line and "ms compiled" in line, line
    assert trainer.engine.compiled == ("compiled from here on" in line)
    assert (tmp_path / "run" / "final" / "model.pt").is_file()

    # Resumed for more steps, the run follows its recorded decision instead of trialling again.
    resumed = Trainer(dataclasses.replace(cfg, max_steps=cfg.max_steps + 2, auto_resume=True))
    assert resumed.run() == EXIT_FINISHED
    out = capsys.readouterr().out
    assert "as the run decided before its checkpoint" in out, out[-2000:]
    assert resumed.engine.compiled == trainer.engine.compiled
