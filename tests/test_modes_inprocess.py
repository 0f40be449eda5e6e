"""Every mode through the real `Trainer`, in-process and in seconds: the loop–objective joint, fast.

For each mode a 2-layer model trains 4 steps with one evaluation and a checkpoint at step 2, then a
second run resumed from that checkpoint must log the same losses for steps 2-3 bitwise (CPU, plain
engine). Post-training modes start from the previous stage's weights, as users chain them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from stop_request import StopAtStep

from minigpt.config import PRESETS, TrainConfig
from minigpt.data.tasks import write_task_files
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.train.loop import Trainer

STEPS, SAVE_AT = 4, 2
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
EXTRA = {"rlhf": dict(rl_group_size=2, rl_max_new_tokens=4, eval_batches=1)}


def rows(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == split]


def run(mode: str, out: Path, data: list[str], data_dir: Path, **options) -> Path:
    settings = dict(seq_len=48, batch_size=4, max_steps=STEPS, warmup_steps=1, eval_interval=0, eval_batches=2,
                    save_interval=SAVE_AT, log_interval=100, sample_prompt="a")
    cfg = TrainConfig.of(mode=mode, config="tiny", data=data, data_dir=str(data_dir), out=str(out),
                      **{**settings, **EXTRA.get(mode, {}), **options})
    assert Trainer(cfg).run() == EXIT_FINISHED
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory, shards, data_tokenizer) -> dict:
    """Run directory per mode, chained: pretrain -> sft -> dpo, reward, rlhf (from sft's weights)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    root = tmp_path_factory.mktemp("modes")
    files = write_task_files(root / "tasks", 48, seed=0, tasks=("sort",))
    data = {"pretrain": [str(shards)], "sft": [str(files["sft"])], "dpo": [str(files["dpo"])],
            "reward": [str(files["dpo"])], "rlhf": [str(files["rlhf"])]}
    init = {"sft": "pretrain", "dpo": "sft", "reward": "sft", "rlhf": "sft"}
    runs: dict[str, Path] = {}
    try:
        for mode in ("pretrain", "sft", "dpo", "reward", "rlhf"):
            options = {"tokenizer": str(data_tokenizer.directory)} if mode == "pretrain" else \
                {"init_from": str(runs[init[mode]])}
            runs[mode] = run(mode, root / mode, data[mode], root, **options)
            resumed = run(mode, root / f"{mode}-resumed", data[mode], root,
                          resume=str(runs[mode] / "ckpt" / f"step_{SAVE_AT:07d}"), **options)
            runs[f"{mode}-resumed"] = resumed
        yield runs
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("mode", ["pretrain", "sft", "dpo", "reward", "rlhf"])
def test_mode_trains_evaluates_saves_and_resumes_bitwise(stages, mode):
    run_dir = stages[mode]
    train = rows(run_dir, "train")
    assert [r["step"] for r in train] == list(range(STEPS))
    assert all(r["loss"] == r["loss"] for r in train)  # finite, not NaN
    evals = rows(run_dir, "val")
    assert evals and all(key.startswith("val_") for key in evals[-1] if key not in ("step", "split", "time"))
    assert (run_dir / "final" / "model.pt").is_file()
    resumed = rows(stages[f"{mode}-resumed"], "train")
    assert [r["step"] for r in resumed] == list(range(SAVE_AT, STEPS))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in train[SAVE_AT:]]


def test_each_mode_reports_its_named_validation_metrics(stages):
    expected = {"pretrain": {"val_loss", "val_bpb"}, "sft": {"val_loss", "val_bpb"},
                "dpo": {"val_loss", "val_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward"},
                "reward": {"val_loss", "val_accuracy", "val_margin", "val_chosen_score", "val_rejected_score"},
                "rlhf": {"val_reward", "val_exact", "val_response_length"}}
    for mode, names in expected.items():
        assert names <= set(rows(stages[mode], "val")[-1]), mode


def test_document_mask_keeps_attention_inside_documents_of_packed_windows(tmp_path, shards, data_tokenizer,
                                                                          monkeypatch):
    from minigpt.data.shards import open_shard
    from minigpt.model import MiniGPT
    from minigpt.modes import build_objective

    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    cfg = TrainConfig.of(mode="pretrain", document_mask=True)
    objective = build_objective(cfg, data_tokenizer)
    reader = open_shard(shards, "train", tokenizer_checksum=data_tokenizer.checksum,
                        vocab_size=data_tokenizer.vocab_size)
    windows = objective.dataset(reader, 48, data_tokenizer)
    spanning = next(w for w in (windows[i] for i in range(len(windows))) if w["segment_ids"].max() > 0)
    model = MiniGPT(dataclasses.replace(SMALL, vocab_size=data_tokenizer.vocab_size)).eval()
    ids = torch.from_numpy(spanning["input_ids"])[None]
    masked = model(ids, segment_ids=torch.from_numpy(spanning["segment_ids"])[None])
    last_doc = int(spanning["segment_ids"].max())
    start = int((spanning["segment_ids"] == last_doc).argmax())
    alone = model(ids[:, start:])  # the last document by itself sees nothing before it
    assert torch.allclose(masked[:, start:], alone, atol=1e-5)
    assert not torch.allclose(model(ids)[:, start:], alone, atol=1e-5)

    run_dir = run("pretrain", tmp_path / "masked", [str(shards)], tmp_path, tokenizer=str(data_tokenizer.directory),
                  document_mask=True)
    assert len(rows(run_dir, "train")) == STEPS
    with pytest.raises(Exception, match="--document-mask applies to --mode pretrain"):
        TrainConfig.of(mode="sft", document_mask=True).validate()


def test_a_signal_during_the_last_step_saves_that_step_and_resume_finishes_without_retraining(
        tmp_path, shards, data_tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    settings = dict(seq_len=48, batch_size=4, max_steps=STEPS, warmup_steps=1, eval_interval=0, eval_batches=1,
                    save_interval=0, log_interval=100, sample_prompt="a", tokenizer=str(data_tokenizer.directory))
    cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(tmp_path),
                      out=str(tmp_path / "run"), **settings)
    trainer = Trainer(cfg)
    assert trainer.run(StopAtStep(trainer, STEPS)) == EXIT_PREEMPTED
    assert "checkpoint saved" in capsys.readouterr().out
    assert (tmp_path / "run" / "ckpt" / f"step_{STEPS:07d}" / "manifest.json").is_file()  # no work lost

    resumed = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(tmp_path),
                          out=str(tmp_path / "run"), auto_resume=True, **settings)
    assert Trainer(resumed).run() == EXIT_FINISHED
    assert [r["step"] for r in rows(tmp_path / "run", "train")] == list(range(STEPS))  # nothing retrained
    assert (tmp_path / "run" / "final" / "model.pt").is_file()
