"""--max-time: duration parsing, the time-following LR decay, the stop decision (a warm-up step that does not
count, an ending that is measured), and real runs that end inside their budget with final weights, also across
a resume, a slow first step, and with training bitwise the same as without the ending's timing pass."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.config import PRESETS, ConfigError, TrainConfig, parse_duration
from minigpt.data.tasks import write_task_files
from minigpt.engine.base import ScheduleClock, warmup_cosine
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.train.budget import ENDING_PASSES, MARGIN, RECENT_STEPS, TimeBudget
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
            TrainConfig.of(max_time=text)


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
    budget.note_step(9.0)  # the first step (warm-up) is left out once a second is measured
    budget.note_step(2.0)
    estimated = budget.reserve()  # before the timing pass the evaluation is extrapolated from a step
    assert estimated == pytest.approx(MARGIN * (2.0 + (2.0 / 2 * 4 / 2 + 2.0) + 2 * 0.5))
    budget.note_ending_pass(1, 0.5, 0.25)
    assert budget.reserve() == pytest.approx(MARGIN * (2.0 + (0.5 * 4 + 0.25) + 2 * 0.5))
    budget.note_eval(5.0)  # a periodic evaluation, measured whole, replaces the timed pass
    budget.note_save(1.0)
    assert budget.reserve() == pytest.approx(MARGIN * (2.0 + 5.0 + 2.0))
    now[0] = 100.0 - budget.reserve() - 0.1
    assert budget.fits(budget.elapsed(), budget.reserve())
    now[0] += 0.2
    assert not budget.fits(budget.elapsed(), budget.reserve())
    budget.spent_before = 30.0  # a resumed run keeps counting
    assert budget.elapsed() == pytest.approx(now[0] + 30.0)
    assert budget.fraction(50.0, 0.0) == pytest.approx(0.5)


def test_a_slow_first_step_does_not_stop_the_run():
    """The machine of the report: a 5.6 s warm-up step, 0.3 s steps after it, 20 s spent of a 122 s budget
    at step 1. Extrapolated from the warm-up step, the evaluation of 100 micro-batches looked like 75 s and
    the run stopped; measured (40 ms a micro-batch, a 0.3 s sample) it is 4.3 s and the run goes on."""
    now = [20.0]
    budget = TimeBudget(122.0, eval_batches=100, grad_accum=4, state_bytes=120_000_000, origin=0.0,
                        clock=lambda: now[0])
    budget.note_step(5.6)
    assert not budget.fits(budget.elapsed(), budget.reserve())  # what extrapolating from the warm-up decided
    budget.note_ending_pass(1, 0.04, 0.3)
    assert budget.evaluation_estimate() == pytest.approx(0.04 * 100 + 0.3)
    assert budget.reserve() == pytest.approx(5.6 + MARGIN * (4.3 + 2 * (0.5 + 1.2)))  # the warm-up: no margin
    assert budget.fits(budget.elapsed(), budget.reserve())
    for seconds in (0.3, 0.31, 0.29):
        budget.note_step(seconds)
    assert budget.step_seconds == pytest.approx(0.3)
    assert budget.reserve() == pytest.approx(MARGIN * (0.3 + 4.3 + 2 * (0.5 + 1.2)))


def test_the_step_estimate_is_the_median_of_recent_steps_after_the_warm_up():
    budget = TimeBudget(100.0, eval_batches=1, grad_accum=1, state_bytes=0)
    assert budget.step_seconds is None
    budget.note_step(8.0)
    assert budget.step_seconds == 8.0  # the only measurement: a next step may be as slow
    for seconds in (2.0, 2.2, 30.0, 2.1):  # one stall does not move the median
        budget.note_step(seconds)
    assert budget.step_seconds == pytest.approx(2.15)
    for _ in range(RECENT_STEPS):  # the steps follow a change of speed (a compiled model)
        budget.note_step(1.0)
    assert budget.step_seconds == 1.0


def test_with_only_the_warm_up_step_a_run_goes_on_only_if_another_as_slow_fits():
    """Every step may really be as slow as the first: the run takes a second step only if one more like it
    and the measured ending still fit, so a run of slow steps ends inside its budget too."""
    now = [7.0]
    budget = TimeBudget(10.0, eval_batches=2, grad_accum=1, state_bytes=0, origin=0.0, clock=lambda: now[0])
    budget.note_step(6.0)
    budget.note_ending_pass(2, 0.2, 0.1)
    assert not budget.fits(budget.elapsed(), budget.reserve())  # a second 6 s step would overrun

    now[0] = 1.0  # start-up; then steps of 2.5 s each, the first one included
    slow = TimeBudget(10.0, eval_batches=2, grad_accum=1, state_bytes=0, origin=0.0, clock=lambda: now[0])
    steps = 0
    while slow.fits(slow.elapsed(), slow.reserve()):
        now[0] += 2.5
        slow.note_step(2.5)
        steps += 1
        if steps == 1:
            slow.note_ending_pass(2, 0.2, 0.1)
            now[0] += 0.3
    ending = 0.3 + 2 * 0.5  # the evaluation and sample as timed, two saves as estimated
    assert steps == 2 and now[0] + ending <= 10.0


def test_the_fastest_of_the_timing_passes_counts_and_a_periodic_evaluation_replaces_them():
    budget = TimeBudget(100.0, eval_batches=6, grad_accum=1, state_bytes=0)
    assert budget.ending_pass_due
    budget.note_ending_pass(1, 0.5, 0.9)  # one micro-batch of the six timed; a busy machine slowed the sample
    assert budget.evaluation_estimate() == pytest.approx(0.5 * 6 + 0.9)
    assert budget.ending_pass_due
    budget.note_ending_pass(3, 0.6, 0.2)  # a short evaluation timed whole
    assert budget.evaluation_estimate() == pytest.approx(0.2 * 6 + 0.2)
    assert not budget.ending_pass_due  # both passes (ENDING_PASSES) done
    periodic = TimeBudget(100.0, eval_batches=6, grad_accum=1, state_bytes=0)
    periodic.note_eval(4.0)
    assert not periodic.ending_pass_due and periodic.evaluation_estimate() == 4.0


def _cfg(tmp_path: Path, shards, data_tokenizer, **options) -> TrainConfig:
    settings = dict(mode="pretrain", data=[str(shards)], out=str(tmp_path / "run"), seq_len=48, batch_size=4,
                    max_steps=100_000, warmup_steps=2, eval_interval=25, eval_batches=2, save_interval=0,
                    log_interval=1000, sample_prompt="a", min_lr_ratio=0.1, learning_rate=1e-3,
                    tokenizer=str(data_tokenizer.directory))
    return TrainConfig.of(config="tiny", data_dir=str(tmp_path), **{**settings, **options})


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

        def saving(self) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

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


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine torch's threads wait on each other and a tiny model's
    steps swing tenfold from one second to the next, which no plan made from measurements can follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.integration
def test_a_slow_first_step_still_leaves_the_budget_to_training(tmp_path, shards, data_tokenizer, monkeypatch,
                                                              capsys, one_torch_thread):
    """The first step takes ten times the others (a warm-up): the run still trains for at least 90% of its
    budget and ends inside it. Extrapolated from that step, the 20-batch evaluation would have looked like
    11 s of a 12 s budget and the run would have stopped at step 1."""
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    budget, step_sleep = 12.0, 0.1
    step_ends: list[float] = []
    train_step = Trainer.train_step

    def slow_first_step(self, batches=None):
        time.sleep(step_sleep * (10 if not step_ends else 1))
        result = train_step(self, batches)
        step_ends.append(time.monotonic())
        return result

    monkeypatch.setattr(Trainer, "train_step", slow_first_step)
    started = time.monotonic()
    # A periodic save times the checkpoint's write early; no periodic evaluation: the timing passes plan it.
    cfg = _cfg(tmp_path, shards, data_tokenizer, max_time=f"{budget:.0f}s", eval_interval=0, eval_batches=20,
               save_interval=25)
    assert Trainer(cfg).run() == EXIT_FINISHED
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert f"--max-time {budget:.0f}s: stopping at step {len(step_ends)} " in out, out[-3000:]
    trained = step_ends[-1] - started
    assert trained >= 0.9 * budget, f"training ended at {trained:.1f} s of {budget:.0f} s ({len(step_ends)} steps)"
    assert took <= budget + 1.0, f"the run took {took:.1f} s of a {budget:.0f} s budget"


def _drawing_random_numbers(eval_micro_batch):
    """`Trainer.eval_micro_batch` that also draws from the python, numpy and torch streams, as an evaluation
    might: the timing pass must put them back."""
    def evaluate_and_draw(self, indices, sums):
        random.random(), np.random.rand(), torch.rand(1)
        return eval_micro_batch(self, indices, sums)
    return evaluate_and_draw


@pytest.mark.parametrize("mode", ["pretrain", *(pytest.param(m, marks=pytest.mark.integration)
                                                for m in ("sft", "dpo", "reward", "rlhf"))])
def test_the_ending_timing_pass_leaves_training_bitwise_unchanged(tmp_path, shards, data_tokenizer, monkeypatch,
                                                                  mode):
    """The same run with and without the pass that times the evaluation (a budget too large to stop it or to
    move the LR: the step count drives the decay): the same losses and final weights, bit for bit, with
    dropout drawing from the torch stream and the evaluation drawing from every stream."""
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    monkeypatch.chdir(tmp_path)  # a previous stage's checkpoints/ in the working directory must not be picked up
    monkeypatch.setattr(Trainer, "eval_micro_batch", _drawing_random_numbers(Trainer.eval_micro_batch))
    files = write_task_files(tmp_path / "tasks", 48, seed=0, tasks=("sort",))
    data = {"pretrain": shards, "sft": files["sft"], "dpo": files["dpo"], "reward": files["dpo"],
            "rlhf": files["rlhf"]}[mode]
    extra = dict(rl_group_size=2, rl_max_new_tokens=4, eval_batches=1) if mode == "rlhf" else {}

    def run(name: str) -> Trainer:
        cfg = _cfg(tmp_path, shards, data_tokenizer, mode=mode, data=[str(data)], out=str(tmp_path / name),
                   max_time="100d", max_steps=5, eval_interval=0, dropout=0.1, **extra)
        trainer = Trainer(cfg)
        assert trainer.run() == EXIT_FINISHED
        return trainer

    assert run("timed").budget.ending_passes == ENDING_PASSES
    monkeypatch.setattr(Trainer, "time_ending", lambda self: None)
    assert run("untimed").budget.ending_passes == 0
    losses = [[r["loss"] for r in _train_rows(tmp_path / name)] for name in ("timed", "untimed")]
    assert losses[0] == losses[1]
    weights = [torch.load(tmp_path / name / "final" / "model.pt", map_location="cpu", weights_only=True)
               for name in ("timed", "untimed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
