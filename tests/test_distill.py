"""Knowledge distillation (`--mode distill`, `--mode distill-sft`): the loss's maths, the teacher's checks, and
training through the real `Trainer` in seconds (a 2-layer student, a 2-layer wider teacher).

The learning proof (a distilled student beats the same student on cross-entropy alone) is the integration
test at the end; bench/distill.py measures it on a larger scale.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from stop_request import StopAtStep

from minigpt.cli.generate import main as generate_main
from minigpt.cli.train import main as train_main
from minigpt.config import PRESETS, ConfigError, TrainConfig
from minigpt.data.tasks import write_task_files
from minigpt.model import MiniGPT
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.tokenizer_training import train_tokenizer
from minigpt.train.distill import distillation_kl
from minigpt.train.loop import Trainer
from minigpt.weights import load_consolidated, save_consolidated

STEPS, STOP_AT = 4, 2
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
TEACHER = dataclasses.replace(SMALL, hidden_size=48, ffn_hidden_size=96)


def rows(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("split") == split]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_tokenizer) -> Path:
    """A wider 2-layer model (random weights suffice for the mechanics) saved with the data's tokenizer."""
    torch.manual_seed(0)
    model = MiniGPT(dataclasses.replace(TEACHER, vocab_size=data_tokenizer.vocab_size))
    return save_consolidated(tmp_path_factory.mktemp("teacher") / "final", model.state_dict(), model.config,
                             data_tokenizer.directory)


def config(mode: str, out: Path, data: list[str], **options) -> TrainConfig:
    settings = dict(seq_len=48, batch_size=4, max_steps=STEPS, warmup_steps=1, eval_interval=2, eval_batches=2,
                    save_interval=0, log_interval=100, sample_prompt="a")
    return TrainConfig.of(mode=mode, config="tiny", data=data, data_dir=str(out.parent), out=str(out),
                          **{**settings, **options})


# -- the loss ---------------------------------------------------------------------------------------------------
def test_kl_is_zero_for_equal_distributions_and_matches_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    assert distillation_kl(student, student, 2.0).abs().max() == 0
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        q = torch.softmax(student / temperature, -1)
        forward = (p * (p.log() - q.log())).sum(-1) * temperature ** 2
        reverse = (q * (q.log() - p.log())).sum(-1) * temperature ** 2
        assert torch.allclose(distillation_kl(student, teacher, temperature), forward, atol=1e-6)
        assert torch.allclose(distillation_kl(student, teacher, temperature, "reverse"), reverse, atol=1e-6)
    assert not torch.allclose(distillation_kl(student, teacher, 1.0), distillation_kl(student, teacher, 1.0, "reverse"))


def test_the_mode_flags_are_checked_by_name():
    with pytest.raises(ConfigError, match="--mode distill and distill-sft need --teacher DIR"):
        TrainConfig.of(mode="distill")
    with pytest.raises(ConfigError, match=r"--distill-alpha must be in \[0, 1\], got 1.5"):
        TrainConfig.of(mode="distill", teacher="t", distill_alpha=1.5)
    with pytest.raises(ConfigError, match="--distill-temperature must be positive"):
        TrainConfig.of(mode="distill", teacher="t", distill_temperature=0)
    with pytest.raises(ConfigError, match="--distill-kl must be one of forward, reverse"):
        TrainConfig.of(mode="distill-sft", teacher="t", distill_kl="both")
    assert TrainConfig.of(mode="sft", teacher="t").warnings() == [
        "--teacher applies to --mode distill, distill-sft, not to --mode sft: ignored"]


# -- the teacher ------------------------------------------------------------------------------------------------
def foreign_teacher(root: Path, corpus: Path) -> Path:
    """A teacher saved with a tokenizer of its own (not the data's), in `root/foreign/final`."""
    other = train_tokenizer([corpus], root / "other_tokenizer", vocab_size=400)
    model = MiniGPT(dataclasses.replace(TEACHER, vocab_size=other.vocab_size))
    return save_consolidated(root / "foreign" / "final", model.state_dict(), model.config, other.directory)


def test_a_teacher_with_another_tokenizer_is_refused_by_name_before_any_step(tiny, tmp_path, shards,
                                                                             data_tokenizer, demo_corpus):
    foreign = foreign_teacher(tmp_path, demo_corpus)
    trainer = Trainer(config("distill", tmp_path / "run", [str(shards)], teacher=str(foreign.parent),
                             tokenizer=str(data_tokenizer.directory)))
    with pytest.raises(ConfigError, match=r"--teacher .*foreign: its tokenizer \(checksum .*\) is not the student's"):
        trainer.run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not rows(tmp_path / "run", "train")
    with pytest.raises(ConfigError, match="--teacher .*nowhere: no consolidated weights"):
        Trainer(config("distill", tmp_path / "run2", [str(shards)], teacher=str(tmp_path / "nowhere")))


def test_a_dry_run_shows_the_teacher_its_size_and_the_memory_it_adds_per_rank(tiny, tmp_path, demo_corpus, teacher,
                                                                              capsys):
    run_dir = tmp_path / "run"
    assert train_main(["--mode", "distill", "--config", "tiny", "--teacher", str(teacher), "--data", str(demo_corpus),
                       "--seq-len", "48", "--batch-size", "4", "--dry-run", "--out", str(run_dir)]) == EXIT_FINISHED
    plan = capsys.readouterr().out
    model, tokenizer = load_consolidated(teacher)
    params = sum(p.numel() for p in model.parameters())
    assert f"teacher         {teacher}: {params:,} parameters, 2 layers; on every rank" in plan
    assert f"{4 * params / 2**20:.1f} MB of fp32 weights" in plan  # docs/training.md: 4 bytes per parameter
    assert f"up to {4 * 4 * 48 * tokenizer.vocab_size / 2**20:.1f} MB in fp32" in plan
    # A fresh student learns in the teacher's tokenizer, so it has the teacher's vocabulary
    assert f"vocab {tokenizer.vocab_size} (tokenizer {teacher})" in plan
    assert not run_dir.exists()


@pytest.mark.parametrize("problem", ["missing", "another tokenizer"])
def test_a_dry_run_refuses_a_teacher_with_the_runs_own_error(problem, tiny, tmp_path, shards, data_tokenizer,
                                                             demo_corpus, capsys):
    teacher = tmp_path / "nowhere" if problem == "missing" else foreign_teacher(tmp_path, demo_corpus).parent
    flags = ["--mode", "distill", "--config", "tiny", "--teacher", str(teacher), "--data", str(shards), "--tokenizer",
             str(data_tokenizer.directory), "--seq-len", "48", "--batch-size", "2", "--max-steps", "1",
             "--eval-interval", "0", "--data-dir", str(tmp_path)]
    assert train_main([*flags, "--dry-run", "--out", str(tmp_path / "dry")]) == 2
    planned = capsys.readouterr().err
    assert train_main([*flags, "--out", str(tmp_path / "run")]) == 2
    ran = capsys.readouterr().err
    assert planned.startswith("error: --teacher") and len(planned.splitlines()) == 1
    assert planned == ran.splitlines(keepends=True)[-1]
    assert not (tmp_path / "dry").exists()


def test_alpha_zero_trains_exactly_as_pretraining(tiny, tmp_path, shards, data_tokenizer, teacher):
    """Cross-entropy only: the same losses, bitwise, as --mode pretrain on the same data and seed; the KL is
    still logged (and the teacher's forward pass draws no random number)."""
    common = dict(tokenizer=str(data_tokenizer.directory))
    pretrain = tmp_path / "pretrain"
    assert Trainer(config("pretrain", pretrain, [str(shards)], **common)).run() == EXIT_FINISHED
    distill = tmp_path / "distill"
    assert Trainer(config("distill", distill, [str(shards)], teacher=str(teacher), distill_alpha=0.0,
                          **common)).run() == EXIT_FINISHED
    assert [r["loss"] for r in rows(distill, "train")] == [r["loss"] for r in rows(pretrain, "train")]
    assert all(r["kl_loss"] > 0 and r["lm_loss"] == r["loss"] for r in rows(distill, "train"))
    assert rows(distill, "val")[-1]["val_bpb"] == rows(pretrain, "val")[-1]["val_bpb"]
    assert rows(distill, "val")[-1]["val_kl"] > 0


def test_the_kl_is_zero_when_the_student_is_the_teacher(tiny, tmp_path, shards, teacher):
    run_dir = tmp_path / "self"
    assert Trainer(config("distill", run_dir, [str(shards)], teacher=str(teacher), init_from=str(teacher),
                          max_steps=1, eval_interval=0)).run() == EXIT_FINISHED
    first = rows(run_dir, "train")[0]
    assert first["kl_loss"] == 0.0 and first["loss"] == pytest.approx(0.5 * first["lm_loss"])



def test_a_hugging_face_llama_teacher_teaches_as_the_model_it_was_exported_from(tiny, tmp_path, shards, teacher):
    pytest.importorskip("safetensors", reason="the Hugging Face import needs safetensors (pip install -e '.[hf]')")
    from minigpt.interop.hf_llama import export_hf

    hf_dir = export_hf(teacher, tmp_path / "hf_teacher")
    losses = {}
    for name, path in (("ours", teacher), ("hf", hf_dir)):
        run_dir = tmp_path / name
        assert Trainer(config("distill", run_dir, [str(shards)], teacher=str(path), max_steps=2,
                              eval_interval=0)).run() == EXIT_FINISHED
        losses[name] = [(r["loss"], r["kl_loss"]) for r in rows(run_dir, "train")]
    assert losses["hf"] == losses["ours"]  # fp32 export: the same teacher, the same tokenizer, the same run
    assert list((tmp_path / "hf" / "teacher_from_hf").glob("hf-import-*/model.pt"))

# -- training -----------------------------------------------------------------------------------------------
def test_distill_takes_the_teachers_tokenizer_resumes_bitwise_and_its_final_generates(
        tiny, tmp_path, shards, data_tokenizer, teacher, capsys):
    """A fresh student (no --tokenizer) learns in the teacher's tokenizer; a run stopped by a signal at step 2
    resumes to the same losses and weights as an uninterrupted one; final/ is a plain model generate reads."""
    whole = tmp_path / "whole"
    options = dict(teacher=str(teacher.parent), distill_temperature=2.0)  # the run directory, not final/
    assert Trainer(config("distill", whole, [str(shards)], **options)).run() == EXIT_FINISHED
    out = capsys.readouterr().out
    assert "tokenizer" in out and "the one --mode distill requires" in out

    interrupted = tmp_path / "interrupted"
    trainer = Trainer(config("distill", interrupted, [str(shards)], **options))
    assert trainer.run(StopAtStep(trainer, STOP_AT)) == EXIT_PREEMPTED
    assert not (interrupted / "final").exists()
    assert Trainer(config("distill", interrupted, [str(shards)], auto_resume=True, **options)).run() == EXIT_FINISHED

    train = rows(whole, "train")
    assert [r["step"] for r in train] == list(range(STEPS))
    assert all(r["loss"] == r["loss"] and r["kl_loss"] > 0 for r in train)
    assert [(r["step"], r["loss"]) for r in rows(interrupted, "train")] == [(r["step"], r["loss"]) for r in train]
    assert {"val_loss", "val_bpb", "val_kl"} <= set(rows(whole, "val")[-1])

    model, tokenizer = load_consolidated(whole / "final")
    resumed, _tokenizer = load_consolidated(interrupted / "final")
    assert tokenizer.checksum == data_tokenizer.checksum
    assert model.config.hidden_size == SMALL.hidden_size  # the student's shape, not the teacher's
    assert all(torch.equal(value, resumed.state_dict()[name]) for name, value in model.state_dict().items())
    snapshot = json.loads((whole / "training_config_snapshot.json").read_text())
    assert snapshot["train"]["distill"]["teacher"] == str(teacher.parent)
    capsys.readouterr()
    assert generate_main(["--model", str(whole), "--prompt", "The", "--max-new-tokens", "4", "--greedy"]) == 0
    assert capsys.readouterr().out.strip()


def test_distill_sft_learns_only_the_assistants_tokens_and_resumes_bitwise(tiny, tmp_path, data_tokenizer, teacher):
    files = write_task_files(tmp_path / "tasks", 48, seed=0, tasks=("sort",))
    options = dict(teacher=str(teacher), init_from=str(teacher.parent), distill_kl="reverse")
    # The student starts from the teacher's weights here only to keep the test fast; any student works.
    whole = tmp_path / "sft"
    assert Trainer(config("distill-sft", whole, [str(files["sft"])], **options)).run() == EXIT_FINISHED
    interrupted = tmp_path / "sft-interrupted"
    trainer = Trainer(config("distill-sft", interrupted, [str(files["sft"])], **options))
    assert trainer.run(StopAtStep(trainer, STOP_AT)) == EXIT_PREEMPTED
    assert Trainer(config("distill-sft", interrupted, [str(files["sft"])], auto_resume=True,
                          **options)).run() == EXIT_FINISHED
    train = rows(whole, "train")
    assert train[0]["kl_loss"] == 0.0  # the student starts as the teacher
    assert [r["loss"] for r in rows(interrupted, "train")] == [r["loss"] for r in train]
    assert (whole / "final" / "model.pt").is_file()


def test_distill_sft_scores_only_assistant_positions(tiny, data_tokenizer, teacher, tmp_path):
    """The teacher's logits and the KL are taken at the labelled (assistant) positions only."""
    from minigpt.data.datasets import IGNORE_INDEX
    from minigpt.modes import build_objective
    from minigpt.train.sequences import FrozenReference

    cfg = TrainConfig.of(mode="distill-sft", teacher=str(teacher))
    objective = build_objective(cfg, data_tokenizer)
    student = load_consolidated(teacher)[0]
    objective.teacher = FrozenReference(MiniGPT(student.config).eval(), torch.device("cpu"), "fp32")
    ids = torch.randint(0, data_tokenizer.vocab_size, (2, 12))
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 6:9]
    labels[1, 10] = ids[1, 11]
    cross_entropy, kl, kept_labels, kept = objective._terms(student, {"input_ids": ids, "labels": labels})
    assert cross_entropy.shape == kl.shape == (4,) and bool(kept.all())
    assert (kl > 0).all()


# -- the learning proof -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_distilled_student_beats_the_same_student_on_cross_entropy_alone(tmp_path, monkeypatch):
    """A teacher wider and deeper than the student trains first on tinyshakespeare (or the demo corpus); then
    the same 2-layer student trains the same steps on the same data twice: cross-entropy only, and distilled.
    The distilled one reaches the lower held-out bits per byte."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_distill", Path(__file__).resolve().parents[1] / "bench" /
                                                  "distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.compare(tmp_path, teacher_steps=300, student_steps=150, quick=True)
    print(bench.table(result))
    assert result["distill"]["val_bpb"] < result["ce"]["val_bpb"], result


@pytest.mark.parametrize("mode", ["distill", "distill-sft"])
def test_debug_fullstack_walks_a_distillation_step(mode, tiny, tmp_path, shards, teacher, capsys, monkeypatch):
    from minigpt.cli.debug_fullstack import main as debug_main

    monkeypatch.chdir(tmp_path)
    data = str(shards) if mode == "distill" else str(write_task_files(tmp_path / "tasks", 16, tasks=("sort",))["sft"])
    assert debug_main(["--mode", mode, "--model-size", "tiny", "--teacher", str(teacher), "--data", data,
                       "--data-dir", str(tmp_path), "--seq-len", "48", "--batch-size", "2", "--prompt", "The"]) == 0
    out = capsys.readouterr().out
    assert "== one optimizer step ==" in out and "== generation ==" in out
    assert f'"{mode}": {{' in out and '"teacher"' in out  # the snapshot shows the mode's options


@pytest.mark.integration
@pytest.mark.deepspeed
def test_distill_under_two_rank_deepspeed_zero3_trains_resumes_and_consolidates(tmp_path, shards, data_tokenizer):
    """The teacher replicated on both ranks, the student sharded by ZeRO-3; a resumed run reloads the teacher."""
    import os
    import shutil
    import subprocess

    from ports import free_port

    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    pytest.importorskip("deepspeed")
    repo = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    model = MiniGPT(dataclasses.replace(PRESETS["tiny"], vocab_size=data_tokenizer.vocab_size, hidden_size=192,
                                        num_heads=6, num_kv_heads=2))
    teacher_dir = save_consolidated(tmp_path / "teacher" / "final", model.state_dict(), model.config,
                                    data_tokenizer.directory)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    args = ["--mode", "distill", "--config", "tiny", "--teacher", str(teacher_dir), "--data", str(shards),
            "--data-dir", str(tmp_path), "--out", str(tmp_path / "zero3"), "--seq-len", "32", "--batch-size", "2",
            "--ds-config", str(repo / "ds_configs" / "zero3.json"), "--warmup-steps", "1", "--eval-interval", "2",
            "--eval-batches", "2", "--save-interval", "2", "--log-interval", "1", "--sample-prompt", "The"]

    def launch(*extra: str) -> str:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(repo / "launch" / "train.py"),
               *args, *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = launch("--max-steps", "4")
    assert "distill: teacher" in first
    resumed = launch("--max-steps", "6", "--auto-resume")
    assert "resumed from" in resumed and "distill: teacher" in resumed
    train = rows(tmp_path / "zero3", "train")
    assert [r["step"] for r in train] == list(range(6))
    assert all(r["kl_loss"] > 0 for r in train)
    assert "val_kl" in rows(tmp_path / "zero3", "val")[-1]
    student, tokenizer = load_consolidated(tmp_path / "zero3" / "final")
    assert tokenizer.checksum == data_tokenizer.checksum and student.config.hidden_size == PRESETS["tiny"].hidden_size
