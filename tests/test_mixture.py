"""Weighted data mixtures (`--data NAME=PATH:WEIGHT`): parsing, the sampler's shares and resumption, and a real
run that logs tokens, epochs and validation loss per source and resumes bitwise."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import CHINESE_LINES

from minigpt.config import PRESETS, ConfigError, TrainConfig, data_name
from minigpt.data.mixture import data_paths, parse_mixture
from minigpt.data.sampler import MixtureSampler, ResumableSampler, SamplerError
from minigpt.signals import EXIT_FINISHED
from minigpt.train.loop import Trainer, dry_run

# -- parsing ---------------------------------------------------------------------------------------------


def test_weighted_entries_parse_into_named_sources_and_name_the_run_directory():
    entries = ["web=shards/web:0.7", "books=demo:zh:0.3"]
    assert [(s.name, s.path, s.weight) for s in parse_mixture(entries)] == [("web", "shards/web", 0.7),
                                                                          ("books", "demo:zh", 0.3)]
    assert data_paths(entries) == ["shards/web", "demo:zh"]
    assert data_name(entries) == "web+books"
    assert TrainConfig.of(data=entries).run_dir.name == "pretrain_tiny_web+books"
    assert parse_mixture(["corpus.txt", "./a=b.txt", "demo:zh"]) == []  # plain entries: no mixture


@pytest.mark.parametrize(("entries", "message"), [
    (["web=shards/web:0"], "--data web=shards/web:0: the weight of web must be a positive number, got '0'"),
    (["web=shards/web:-1"], "the weight of web must be a positive number, got '-1'"),
    (["web=shards/web:lots"], "the weight of web must be a positive number, got 'lots'"),
    (["web=shards/web:nan"], "the weight of web must be a positive number, got 'nan'"),
    (["web=shards/web"], "--data web=shards/web: no weight; a named source is NAME=PATH:WEIGHT"),
    (["web=:0.7"], "--data web=:0.7: source web has a weight but no path"),
    (["web=a:0.5", "web=b:0.5"], "--data: source name 'web' is given twice"),
    (["web=a:0.5", "b.txt"], "--data b.txt: no NAME= and :WEIGHT, but other entries are weighted"),
])
def test_bad_mixture_entries_are_refused_naming_the_entry(entries, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.of(data=entries)


def test_dry_run_shows_each_sources_share(tmp_path, capsys):
    cfg = TrainConfig.of(data=["web=demo:en:7", "classics=demo:zh:3"], out=str(tmp_path / "run"), dry_run=True)
    assert dry_run(cfg) == EXIT_FINISHED
    assert "mixture         web 70.0%, classics 30.0% of the tokens" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["dpo", "reward", "rlhf"])
def test_modes_without_fixed_length_samples_refuse_a_mixture_by_name(mode, tmp_path):
    cfg = TrainConfig.of(mode=mode, data=["a=demo:en:1", "b=demo:zh:1"], out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=f"--mode {mode} cannot train on a weighted mixture .* modes that can: "
                                          "pretrain, sft"):
        dry_run(cfg)


# -- the sampler -----------------------------------------------------------------------------------------


def sampler(sizes=(1000, 40), weights=(0.7, 0.3), rank=0, world=1, micro=4, accum=2, seed=5) -> MixtureSampler:
    return MixtureSampler(["web", "books"], list(sizes), list(weights), micro_batch_size=micro, grad_accum=accum,
                          rank=rank, world_size=world, seed=seed)


def global_batches(mix: MixtureSampler, steps: int) -> list[np.ndarray]:
    return [mix.next_global_batch() for _ in range(steps)]


def test_sources_get_their_share_of_tokens_within_one_sample_at_every_step():
    mix = sampler()
    for step in range(1, 201):
        batch = mix.next_global_batch()
        assert len(batch) == 8
        drawn = np.array(mix.drawn)
        assert drawn.sum() == 8 * step
        assert np.all(np.abs(drawn - 8 * step * np.array([0.7, 0.3])) <= 1.0), (step, drawn)
    # Indices 0-999 are web's, 1000-1039 books': the batches hold what the counts say.
    everything = np.concatenate(global_batches(sampler(), 200))
    assert np.mean(everything >= 1000) == pytest.approx(0.3, abs=1 / 1600)


def test_each_slot_goes_to_the_most_overdue_source():
    """The batch-at-once schedule is the rule the docs state: slot after slot, the smallest (drawn + 1) / weight,
    ties to the earlier source."""
    weights, drawn, expected = [0.5, 0.2, 0.3], [0, 0, 0], []
    for _slot in range(8 * 40):
        source = min(range(3), key=lambda k: ((drawn[k] + 1) / weights[k], k))
        expected.append(source)
        drawn[source] += 1
    mix = MixtureSampler(["a", "b", "c"], [100, 7, 1000], weights, micro_batch_size=4, grad_accum=2)
    batches = np.concatenate(global_batches(mix, 40))
    assert (np.searchsorted([100, 107], batches, side="right")).tolist() == expected
    assert mix.drawn == drawn


def test_weights_are_shares_of_their_sum():
    mix = sampler(weights=(7, 3))
    global_batches(mix, 50)
    assert mix.drawn == [280, 120]


def test_a_small_source_repeats_every_sample_once_per_epoch_in_a_new_order():
    mix = sampler(sizes=(1000, 40))
    books = [i - 1000 for i in np.concatenate(global_batches(mix, 50)) if i >= 1000]  # 120 draws: 3 epochs
    epochs = [books[k * 40:(k + 1) * 40] for k in range(3)]
    assert all(sorted(epoch) == list(range(40)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert mix.epochs() == {"web": 0.28, "books": 3.0}


def test_the_schedule_is_deterministic_and_seeded():
    same = [np.array_equal(a, b) for a, b in zip(global_batches(sampler(), 20), global_batches(sampler(), 20),
                                                  strict=True)]
    assert all(same)
    other = global_batches(sampler(seed=6), 20)
    assert not all(np.array_equal(a, b) for a, b in zip(global_batches(sampler(), 20), other, strict=True))


def test_resumed_sampler_continues_exactly_even_on_another_world_size():
    straight = global_batches(sampler(), 30)
    first = sampler()
    global_batches(first, 12)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    # Two ranks with half the micro-batch each: the same global batch of 8.
    ranks = [sampler(rank=r, world=2, micro=2) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    for step in range(12, 30):
        parts = [rank.next_step() for rank in ranks]
        assembled = np.concatenate([parts[r][m] for m in range(2) for r in range(2)])
        assert np.array_equal(assembled, straight[step])


def test_a_sampler_state_that_does_not_fit_the_run_is_refused_by_name():
    state = sampler().state_dict()
    with pytest.raises(SamplerError, match="gives source books weight 0.3, this run 0.5"):
        sampler(weights=(0.7, 0.5)).load_state_dict(state)
    with pytest.raises(SamplerError, match="source books of 40 samples, this one has 41"):
        sampler(sizes=(1000, 41)).load_state_dict(state)
    with pytest.raises(SamplerError, match="of a run on one dataset; this run mixes sources web, books"):
        sampler().load_state_dict(ResumableSampler(100, 4, 2).state_dict())
    with pytest.raises(SamplerError, match="of a mixture of sources web, books; this run trains on one dataset"):
        ResumableSampler(100, 4, 2).load_state_dict(state)
    state["sources"]["web"]["drawn"] = -1
    with pytest.raises(SamplerError, match="sampler.sources.web.drawn must be a non-negative integer"):
        sampler().load_state_dict(state)


def test_an_empty_source_is_refused_by_name():
    with pytest.raises(SamplerError, match="source books has no training samples"):
        sampler(sizes=(1000, 0))


# -- a real run ------------------------------------------------------------------------------------------

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
STEPS, SAVE_AT = 6, 3


def rows(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == split]


@pytest.fixture(scope="module")
def mixture_runs(tmp_path_factory, shards, data_tokenizer):
    """A 0.7/0.3 pretraining mixture of the demo shards and a small Chinese file (it repeats), trained for
    STEPS steps with a checkpoint at SAVE_AT, then resumed from that checkpoint in a second run."""
    root = tmp_path_factory.mktemp("mixture")
    classics = root / "classics.jsonl"
    classics.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n"
                                for line in CHINESE_LINES * 5), encoding="utf-8")
    data = [f"en={shards}:0.7", f"zh={classics}:0.3"]
    settings = dict(mode="pretrain", config="tiny", data=data, data_dir=str(root / "data"),
                    tokenizer=str(data_tokenizer.directory), seq_len=32, batch_size=5, grad_accum=2,
                    max_steps=STEPS, warmup_steps=1, eval_interval=3, eval_batches=1, save_interval=SAVE_AT,
                    log_interval=100, sample_prompt="a", val_fraction=0.2, allow_low_coverage=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny", SMALL)
        straight, said = root / "straight", io.StringIO()
        with contextlib.redirect_stdout(said):
            assert Trainer(TrainConfig.of(out=str(straight), **settings)).run() == EXIT_FINISHED
        (straight / "said.txt").write_text(said.getvalue())
        resumed, said = root / "resumed", io.StringIO()
        with contextlib.redirect_stdout(said):
            assert Trainer(TrainConfig.of(out=str(resumed), resume=str(straight / "ckpt" / f"step_{SAVE_AT:07d}"),
                                       **settings)).run() == EXIT_FINISHED
        (resumed / "said.txt").write_text(said.getvalue())
    return straight, resumed


def test_mixture_run_logs_tokens_epochs_and_validation_loss_per_source(mixture_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight, _resumed = mixture_runs
    train = rows(straight, "train")
    assert [r["step"] for r in train] == list(range(STEPS))
    for r in train:  # 10 windows of 32 tokens a step: 7 from en, 3 from zh
        assert (r["tokens/en"], r["tokens/zh"]) == (7 * 32 * (r["step"] + 1), 3 * 32 * (r["step"] + 1))
    stats = json.loads((straight / "dataset_stats.json").read_text())["mixture"]
    assert stats["en"]["weight"] == 0.7 and stats["zh"]["share"] == pytest.approx(0.3)
    zh_size = stats["zh"]["train_samples"]
    assert zh_size < 3 * STEPS  # the small source repeats within the run ...
    assert train[-1]["epochs/zh"] == pytest.approx(3 * STEPS / zh_size)
    assert stats["zh"]["tokens_per_epoch"] == zh_size * 32
    evals = rows(straight, "val")
    assert [r["step"] for r in evals] == [2, 5]
    assert all(r["val_loss/en"] > 0 and r["val_loss/zh"] > 0 for r in evals)
    last = evals[-1]  # both sources' windows together
    assert min(last["val_loss/en"], last["val_loss/zh"]) <= last["val_loss"] <= max(last["val_loss/en"],
                                                                                  last["val_loss/zh"])
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("tokens/zh")] == list(range(STEPS))
    assert events.Scalars("tokens/en")[-1].value == 7 * 32 * STEPS
    assert [e.step for e in events.Scalars("val_loss/en")] == [2, 5]
    assert events.Scalars("val_loss/zh")[-1].value == pytest.approx(evals[-1]["val_loss/zh"])
    assert "epochs/zh" in events.Tags()["scalars"]


def test_mixture_run_says_when_a_source_begins_another_epoch(mixture_runs):
    straight, resumed = mixture_runs
    zh_size = json.loads((straight / "dataset_stats.json").read_text())["mixture"]["zh"]["train_samples"]
    # 3 zh samples a step: epoch e (from 2) begins at the step whose draws pass (e - 1) x zh_size.
    expected = [f"source zh begins epoch {epoch} at step {-(-((epoch - 1) * zh_size + 1) // 3)}: its {zh_size:,} "
                f"training samples ({zh_size * 32:,} tokens) are seen again"
                for epoch in range(2, 3 * STEPS // zh_size + 1 + (3 * STEPS % zh_size > 0))]
    said = [line for line in (straight / "said.txt").read_text().splitlines() if line.startswith("source ")]
    assert expected and [line.split(", in a new order")[0] for line in said] == expected
    # The resumed run says the epochs that begin after its checkpoint, and only those.
    again = [line for line in (resumed / "said.txt").read_text().splitlines() if line.startswith("source ")]
    assert again == [line for line in said if int(line.split(" at step ")[1].split(":")[0]) > SAVE_AT]
    assert again


def test_mixture_run_resumes_bitwise(mixture_runs):
    straight, resumed = mixture_runs
    train, again = rows(straight, "train"), rows(resumed, "train")
    assert [r["step"] for r in again] == list(range(SAVE_AT, STEPS))
    assert [r["loss"] for r in again] == [r["loss"] for r in train[SAVE_AT:]]
    assert [(r["tokens/en"], r["tokens/zh"], r["epochs/zh"]) for r in again] == \
        [(r["tokens/en"], r["tokens/zh"], r["epochs/zh"]) for r in train[SAVE_AT:]]
    assert rows(resumed, "val")[-1]["val_loss/zh"] == rows(straight, "val")[-1]["val_loss/zh"]


def test_sft_trains_on_a_mixture_of_chat_files(tmp_path, data_tokenizer, monkeypatch):
    from minigpt.data.demo import write_demo_post_training

    monkeypatch.chdir(tmp_path)  # sft starts from checkpoints/pretrain_<preset> when one is there: not a repo's own

    tasks = write_demo_post_training(tmp_path / "tasks.jsonl", "sft", 60, seed=1)
    chats = write_demo_post_training(tmp_path / "chats.jsonl", "sft", 30, seed=2)
    cfg = TrainConfig.of(mode="sft", config="tiny", data=[f"tasks={tasks}:3", f"chats={chats}:1"],
                      data_dir=str(tmp_path / "data"), tokenizer=str(data_tokenizer.directory), out=str(tmp_path / "run"),
                      seq_len=48, batch_size=4, max_steps=2, warmup_steps=1, eval_interval=0, eval_batches=1,
                      log_interval=100, sample_prompt="a", allow_low_coverage=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny", SMALL)
        assert Trainer(cfg).run() == EXIT_FINISHED
    train = rows(tmp_path / "run", "train")
    assert [(r["tokens/tasks"], r["tokens/chats"]) for r in train] == [(3 * 48, 48), (6 * 48, 2 * 48)]
    assert {"val_loss/tasks", "val_loss/chats"} <= set(rows(tmp_path / "run", "val")[-1])


@pytest.mark.integration
@pytest.mark.deepspeed
def test_a_two_rank_mixture_run_continues_on_one_rank_with_the_same_draws(tmp_path, shards, data_tokenizer):
    """2 DeepSpeed ranks (gloo) evaluate every source and save; the plain engine on one rank resumes with the same
    global batch and draws exactly the samples the 2-rank run drew (same tokens per source, same losses to
    the engines' summation order)."""
    import os
    import shutil
    import subprocess
    import sys

    from ports import free_port

    pytest.importorskip("deepspeed")
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    repo = Path(__file__).resolve().parents[1]
    classics = tmp_path / "classics.jsonl"
    classics.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n"
                                for line in CHINESE_LINES * 5), encoding="utf-8")
    common = ["--config", "tiny", "--seq-len", "32", "--warmup-steps", "1", "--max-steps", "8", "--eval-interval", "4",
              "--eval-batches", "1", "--save-interval", "4", "--log-interval", "100", "--sample-prompt", "a",
              "--data", f"en={shards}:0.7", "--data", f"zh={classics}:0.3", "--val-fraction", "0.2",
              "--data-dir", str(tmp_path / "data"), "--tokenizer", str(data_tokenizer.directory),
              "--allow-low-coverage", "--precision", "fp32"]

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(repo)})
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    two = tmp_path / "two"
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(repo / "launch" / "train.py"),
         *common, "--batch-size", "5", "--ds-config", str(repo / "ds_configs" / "zero1.json"), "--out", str(two)])
    one = tmp_path / "one"
    run([sys.executable, str(repo / "launch" / "train.py"), *common, "--batch-size", "10", "--out", str(one),
         "--resume", str(two / "ckpt" / "step_0000004")])
    ranks2, rank1 = rows(two, "train"), rows(one, "train")
    assert [r["step"] for r in rank1] == list(range(4, 8))
    assert [(r["tokens/en"], r["tokens/zh"]) for r in rank1] == [(r["tokens/en"], r["tokens/zh"]) for r in ranks2[4:]]
    for a, b in zip(rank1, ranks2[4:], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a["step"], a["loss"], b["loss"])
    assert {"val_loss/en", "val_loss/zh"} <= set(rows(two, "val")[0])
    assert rows(one, "val")[-1]["val_loss/zh"] == pytest.approx(rows(two, "val")[-1]["val_loss/zh"], abs=1e-3)
