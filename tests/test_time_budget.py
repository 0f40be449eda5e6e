"""--max-time: duration parsing, the time-following LR decay, the stop decision, and real runs that end
inside their budget with final weights, also across a resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt.config import PRESETS, ConfigError, TrainConfig, parse_duration
from minigpt.engine.base import ScheduleClock, warmup_cosine
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.train.budget import MARGIN, TimeBudget
from minigpt.train.loop import Trainer

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("2m", 120), ("1h30m", 5400), ("1.5h", 5400),
                                           ("2d", 172800), ("1:30:00", 5400), ("05:00", 300),
                                           ("1-02:00:00", 93600), (" 10M ", 600), ("0.5s", 0.5)])
def test_durations_in_the_forms_users_write(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, message", [("90", "give a unit"), ("2 minutes", "not a duration"),
                                           ("0s", "longer than zero"), ("", "not a duration"),
                                           ("1h-30m", "not a duration")])
def test_bad_durations_are_refused_by_name(text, message):
    with pytest.raises(ConfigError, match=f"--max-time.*{message}"):
        parse_duration(text)
    if text:
        with pytest.raises(ConfigError, match="--max-time"):
            TrainConfig(max_time=text)


def test_the_decay_follows_the_budget_when_it_is_further_along_than_the_steps():
    clock = ScheduleClock()
    assert warmup_cosine(0, 10, 1000, 0.1, clock) == pytest.approx(0.1)  # warmup is counted in steps
    assert warmup_cosine(20, 10, 1000, 0.1, clock) == pytest.approx(warmup_cosine(20, 10, 1000, 0.1))
    clock.fraction = 0.5
    assert warmup_cosine(20, 10, 1000, 0.1, clock) == pytest.approx(0.55)  # half-way down the cosine
    clock.fraction = 1.0
    assert warmup_cosine(20, 10, 1000, 0.1, clock) == pytest.approx(0.1)
    clock.fraction = 0.0
    assert warmup_cosine(1000, 10, 1000, 0.1, clock) == pytest.approx(0.1)  # steps further along: steps win


def test_the_decay_starts_at_the_peak_however_much_of_the_budget_warmup_used():
    """Warmup took 40% of the budget: the cosine then runs over the remaining 60% from the peak LR, rather
    than dropping at once to where 40% of the whole budget would put it (0.1 + 0.9 * 0.65 = 0.69)."""
    clock = ScheduleClock()
    clock.fraction = 0.38
    assert warmup_cosine(9, 10, 1000, 0.1, clock) == pytest.approx(1.0)  # the last warmup step
    clock.fraction = 0.4
    assert warmup_cosine(10, 10, 1000, 0.1, clock) == pytest.approx(1.0)  # the first decay step: no jump
    assert clock.warmup_end == pytest.approx(0.4)
    clock.fraction = 0.7  # half of what was left after warmup
    assert warmup_cosine(11, 10, 1000, 0.1, clock) == pytest.approx(0.55)
    clock.fraction = 1.0
    assert warmup_cosine(12, 10, 1000, 0.1, clock) == pytest.approx(0.1)
    # A resumed run gets the recorded end of warmup back and continues the same curve.
    resumed = ScheduleClock(fraction=0.7, warmup_end=clock.warmup_end)
    assert warmup_cosine(11, 10, 1000, 0.1, resumed) == pytest.approx(0.55)


def test_the_reserve_uses_this_runs_measurements_and_the_decision_keeps_them_free():
    now = [0.0]
    budget = TimeBudget(100.0, eval_batches=4, grad_accum=2, state_bytes=0, clock=lambda: now[0])
    budget.note_step(9.0)  # the first step (warm-up) is replaced by the second
    budget.note_step(2.0)
    estimated = budget.reserve()
    assert estimated == pytest.approx(MARGIN * (2.0 + (2.0 / 2 * 4 / 2 + 2.0) + 2 * 0.5))
    budget.note_eval(5.0)
    budget.note_save(1.0)
    assert budget.reserve() == pytest.approx(MARGIN * (2.0 + 5.0 + 2.0))
    now[0] = 100.0 - budget.reserve() - 0.1
    assert budget.fits(budget.elapsed(), budget.reserve())
    now[0] += 0.2
    assert not budget.fits(budget.elapsed(), budget.reserve())
    budget.spent_before = 30.0  # a resumed run keeps counting
    assert budget.elapsed() == pytest.approx(now[0] + 30.0)
    assert budget.fraction(50.0, 0.0) == pytest.approx(0.5)


def _cfg(tmp_path: Path, shards, data_tokenizer, **options) -> TrainConfig:
    settings = dict(seq_len=48, batch_size=4, max_steps=100_000, warmup_steps=2, eval_interval=25,
                    eval_batches=2, save_interval=0, log_interval=1000, sample_prompt="a", min_lr_ratio=0.1,
                    learning_rate=1e-3, tokenizer=str(data_tokenizer.directory))
    return TrainConfig(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(tmp_path),
                       out=str(tmp_path / "run"), **{**settings, **options})


def _train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == "train"]


@pytest.mark.integration
def test_a_run_with_a_budget_ends_inside_it_with_final_weights_and_a_decayed_lr(
        tmp_path, shards, data_tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    started = time.monotonic()
    assert Trainer(_cfg(tmp_path, shards, data_tokenizer, max_time="15s")).run() == EXIT_FINISHED
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert "--max-time 15s: stopping at step" in out
    assert took <= 15.0 + 1.0, f"the run took {took:.1f} s of a 15 s budget"
    assert (tmp_path / "run" / "final" / "model.pt").is_file()
    rows = _train_rows(tmp_path / "run")
    assert 3 <= len(rows) < 100_000, out[-3000:]  # hundreds on a quiet machine, a few on a loaded one
    assert rows[-1]["lr"] < 0.4 * 1e-3  # decayed most of the way from 1e-3 to min_lr (1e-4) as time ran out
    assert rows[len(rows) // 2]["lr"] > rows[-1]["lr"]


@pytest.mark.integration
def test_resume_keeps_counting_the_time_already_spent(tmp_path, shards, data_tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    first = Trainer(_cfg(tmp_path, shards, data_tokenizer, max_time="1h"))

    class StopAtStep3:
        signal_name = "SIGTERM"
        requested = property(lambda self: first.step >= 3)

        def uninstall(self) -> None:
            pass

    assert first.run(StopAtStep3()) == EXIT_PREEMPTED
    state = json.loads((tmp_path / "run" / "ckpt" / "step_0000003" / "trainer_state.json").read_text())
    spent = state["elapsed_seconds"]
    assert spent > 0
    assert 0.0 <= state["lr_warmup_end"] < 0.01  # warmup (2 steps) ended early in the hour
    # The same run resumed with a budget the first part already used up: no more steps, but final weights.
    resumed = Trainer(_cfg(tmp_path, shards, data_tokenizer, max_time=f"{spent:.3f}s", auto_resume=True))
    assert resumed.run() == EXIT_FINISHED
    assert resumed.engine.schedule_clock.warmup_end == state["lr_warmup_end"]
    assert [r["step"] for r in _train_rows(tmp_path / "run")] == [0, 1, 2]
    assert (tmp_path / "run" / "final" / "model.pt").is_file()
    assert "stopping at step 3" in capsys.readouterr().out


@pytest.mark.integration
def test_the_whole_process_fits_the_budget_interpreter_start_up_included(tmp_path, shards, data_tokenizer):
    """`--max-time 20s` is what `time python launch/train.py ...` reads (what a Slurm --time limit counts),
    not 20 s after the imports and set-up."""
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(repo / "launch" / "train.py"), "--mode", "pretrain", "--config", "tiny",
               "--data", str(shards), "--data-dir", str(tmp_path), "--tokenizer", str(data_tokenizer.directory),
               "--out", str(tmp_path / "run"), "--seq-len", "48", "--batch-size", "4", "--max-steps", "100000",
               "--warmup-steps", "2", "--eval-interval", "0", "--eval-batches", "2", "--save-interval", "0",
               "--sample-prompt", "a", "--max-time", "20s"]
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, done_at = [], None
    for line in proc.stdout:  # when the run says it is done, before the interpreter's own exit
        lines.append(line)
        if line.startswith("done: "):
            done_at = time.monotonic() - started
    took = time.monotonic() - started
    output = "".join(lines)
    assert proc.wait(timeout=60) == 0, output[-3000:]
    assert "--max-time 20s: stopping at step" in output
    assert took <= 20.0 + 1.5, f"the process took {took:.1f} s of a 20 s budget"
    # What the run counted as spent covers the interpreter's start-up and imports (seconds), not only set-up.
    counted = float(output.split(" s of 20 s")[0].rsplit(" in ", 1)[1])
    assert counted >= done_at - 0.3, f"the run counted {counted:.1f} s of the {done_at:.1f} s it had run"


@pytest.mark.integration
def test_eval_batches_beyond_the_validation_set_do_not_inflate_the_reserve(tmp_path, shards, data_tokenizer,
                                                                           monkeypatch, capsys):
    """`--eval-batches 100000` means "the whole validation set": the ending is estimated from the batches that
    set really has, so a 15 s budget still trains (it used to stop after one step, reserving hours)."""
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    trainer = Trainer(_cfg(tmp_path, shards, data_tokenizer, max_time="15s", eval_batches=100_000, eval_interval=0))
    assert trainer.run() == EXIT_FINISHED
    assert len(_train_rows(tmp_path / "run")) >= 10, capsys.readouterr().out[-2000:]


@pytest.mark.integration
def test_a_budget_spent_mostly_in_warmup_says_so_and_suggests_a_warmup(tmp_path, shards, data_tokenizer, monkeypatch,
                                                                       capsys):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    trainer = Trainer(_cfg(tmp_path, shards, data_tokenizer, max_time="6s", warmup_steps=1_000_000))
    assert trainer.run() == EXIT_FINISHED
    out = capsys.readouterr().out
    assert f"warning: the warmup (--warmup-steps 1000000) took most of the {trainer.step} steps" in out, out[-2000:]
    assert f"--warmup-steps {max(1, trainer.step // 10)} or so" in out
