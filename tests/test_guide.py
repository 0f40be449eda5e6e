"""The quick-start guide's commands work as written (issue 13): debug_fullstack in every mode, tokenizers
compared by content, an honest --dry-run, samples in the data's language and through the chat template."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from minigpt.cli import debug_fullstack
from minigpt.cli import train as train_cli
from minigpt.config import PRESETS, TrainConfig
from minigpt.data.build import build_dataset
from minigpt.data.tasks import write_task_files
from minigpt.signals import EXIT_FINISHED
from minigpt.train.loop import Trainer, default_sample_prompt

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
QUICK = ["--seq-len", "48", "--batch-size", "2", "--warmup-steps", "0", "--eval-interval", "0",
         "--eval-batches", "1", "--log-interval", "100", "--rl-group-size", "2", "--rl-max-new-tokens", "4"]


@pytest.fixture(scope="module")
def guide(tmp_path_factory, shards, data_tokenizer) -> Path:
    """A working directory with a finished 2-layer `pretrain_tiny` run and the task files."""
    patch = pytest.MonkeyPatch()
    patch.setitem(PRESETS, "tiny", SMALL)
    root = tmp_path_factory.mktemp("guide")
    patch.chdir(root)
    write_task_files(root / "tasks", 24, seed=0)
    cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], tokenizer=str(data_tokenizer.directory),
                      out="checkpoints/pretrain_tiny", seq_len=48, batch_size=2, max_steps=2, warmup_steps=0,
                      eval_interval=0, eval_batches=1, log_interval=100)
    assert Trainer(cfg).run() == EXIT_FINISHED
    yield root
    patch.undo()


@pytest.mark.integration
@pytest.mark.parametrize("mode,data", [("sft", "sft"), ("dpo", "dpo"), ("reward", "dpo"), ("rlhf", "rlhf")])
def test_debug_fullstack_walks_every_post_training_mode(guide, capsys, mode, data):
    code = debug_fullstack.main(["--mode", mode, "--model-size", "tiny", "--data", f"tasks/{data}.jsonl",
                                 "--init-from", "checkpoints/pretrain_tiny", *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    assert "== one optimizer step ==" in out and "== generation ==" in out
    if mode in ("sft", "dpo", "rlhf"):  # the sample shows chat behaviour: a user turn answered
        assert "[user] " in out and "[assistant] " in out


@pytest.mark.integration
@pytest.mark.parametrize("init_from", ["nowhere", "tasks"])
def test_debug_fullstack_bad_init_from_is_one_error_line(guide, capsys, init_from):
    code = debug_fullstack.main(["--mode", "dpo", "--data", "tasks/dpo.jsonl", "--init-from", init_from, *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --init-from") and "Traceback" not in err


@pytest.mark.integration
def test_a_byte_identical_tokenizer_copy_is_accepted_for_post_training(guide, tmp_path, capsys):
    copy = shutil.copytree(guide / "checkpoints" / "pretrain_tiny" / "final", tmp_path / "tok",
                           ignore=shutil.ignore_patterns("model.pt", "config.json"))
    code = train_cli.main(["--mode", "sft", "--data", "tasks/sft.jsonl", "--init-from", "checkpoints/pretrain_tiny",
                           "--tokenizer", str(copy), "--max-steps", "1", "--out", str(tmp_path / "sft"), *QUICK])
    assert code == 0, capsys.readouterr().err


def test_dry_run_reports_the_tokenizers_vocabulary_and_parameters(data_tokenizer, tmp_path, capsys, demo_corpus):
    code = train_cli.main(["--data", str(demo_corpus), "--tokenizer", str(data_tokenizer.directory), "--dry-run",
                           "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    expected = dataclasses.replace(PRESETS["tiny"], vocab_size=data_tokenizer.vocab_size)
    assert code == 0
    assert f"{expected.num_params():,} parameters, vocab {data_tokenizer.vocab_size}" in out


def test_default_sample_prompt_is_the_start_of_a_chinese_validation_document(tmp_path, data_tokenizer,
                                                                           chinese_jsonl):
    out = tmp_path / "zh"
    build_dataset([chinese_jsonl], out, data_tokenizer, kind="pretrain", val_fraction=0.2, seed=0, progress=False)
    prompt = default_sample_prompt(data_tokenizer, [out], chat=False)
    assert prompt and not prompt.startswith("The")
    texts = [json.loads(row)["text"] for row in chinese_jsonl.read_text(encoding="utf-8").splitlines()]
    assert any(text.startswith(prompt) for text in texts)


def test_default_sample_prompt_of_chat_data_is_its_first_user_turn(tmp_path, data_tokenizer):
    files = write_task_files(tmp_path / "tasks", 10, seed=0)
    out = tmp_path / "sft"
    build_dataset([files["sft"]], out, data_tokenizer, kind="sft", val_fraction=0.2, seed=0, progress=False)
    prompt = default_sample_prompt(data_tokenizer, [out], chat=True)
    prompts = {json.loads(row)["conversations"][0]["content"] for row in files["sft"].read_text().splitlines()}
    assert prompt in prompts


def test_unseen_characters_are_named(data_tokenizer, tmp_path, demo_corpus):
    from minigpt.tokenizer_training import train_tokenizer

    english = train_tokenizer([demo_corpus], tmp_path / "en", vocab_size=400)
    assert english.unseen_characters("你好 hello 你") == "你好"
    assert data_tokenizer.unseen_characters("你好") == ""


def tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars("train/loss")]
    return steps


@pytest.mark.integration
def test_a_new_run_into_another_runs_directory_is_refused_unless_overwrite(guide, data_tokenizer, shards, capsys):
    common = ["--data", str(shards), "--tokenizer", str(data_tokenizer.directory), "--out", "checkpoints/again",
              "--max-steps", "2", *QUICK]
    assert train_cli.main(common) == 0
    capsys.readouterr()
    assert train_cli.main(common) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoints/again holds another run") and "--auto-resume" in err
    assert "--out" in err and "--overwrite" in err
    assert train_cli.main([*common, "--dry-run"]) == 2  # the plan says so too
    capsys.readouterr()
    assert train_cli.main([*common, "--overwrite", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out  # one numbering: the 3rd step's evaluation, the run's end, its checkpoint
    assert "step 3 val:" in out and "done: 3 steps" in out and "step 2 val:" not in out
    assert (guide / "checkpoints" / "again" / "ckpt" / "step_0000003").is_dir()
    assert tensorboard_steps(guide / "checkpoints" / "again") == [0, 1, 2]  # one run's events, not two
    assert [json.loads(line)["step"] for line in (guide / "checkpoints" / "again" / "metrics.jsonl")
            .read_text().splitlines() if json.loads(line)["split"] == "train"] == [0, 1, 2]


@pytest.mark.integration
def test_auto_resume_without_a_checkpoint_clears_the_attempts_events(guide, data_tokenizer, shards, capsys):
    run_dir = guide / "checkpoints" / "interrupted"
    common = ["--data", str(shards), "--tokenizer", str(data_tokenizer.directory), "--out", str(run_dir), *QUICK]
    assert train_cli.main([*common, "--max-steps", "3", "--save-interval", "0"]) == 0
    shutil.rmtree(run_dir / "ckpt")  # as if killed before its first checkpoint: events and metrics stay
    (run_dir / "latest").unlink()
    shutil.rmtree(run_dir / "final")
    assert train_cli.main([*common, "--max-steps", "2", "--auto-resume"]) == 0
    assert "removing that attempt's" in capsys.readouterr().out
    assert tensorboard_steps(run_dir) == [0, 1]


@pytest.mark.integration
def test_resuming_with_another_max_steps_warns_that_the_schedule_changes(guide, data_tokenizer, shards, capsys):
    common = ["--data", str(shards), "--tokenizer", str(data_tokenizer.directory), "--out", "checkpoints/longer",
              "--save-interval", "1", *QUICK]
    assert train_cli.main([*common, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert train_cli.main([*common, "--max-steps", "3", "--auto-resume"]) == 0
    out = capsys.readouterr().out
    assert "warning: resuming with --max-steps 3, the checkpoint's run had 2" in out


def test_warmup_longer_than_half_the_run_is_warned(tmp_path, capsys):
    assert TrainConfig.of(warmup_steps=10, max_steps=100).warnings() == []
    [warning] = TrainConfig.of(warmup_steps=100, max_steps=40).warnings()
    assert "--warmup-steps 100" in warning and "--max-steps 40" in warning
    assert train_cli.main(["--warmup-steps", "100", "--max-steps", "40", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "warmup-steps 100 is more than half" in capsys.readouterr().out


@pytest.mark.integration
def test_generate_accepts_a_run_directory(guide, capsys):
    from minigpt.cli import generate as generate_cli

    code = generate_cli.main(["--model", "checkpoints/pretrain_tiny", "--prompt", "The", "--max-new-tokens", "4",
                              "--greedy"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("The")


def test_demo_post_training_data_is_bilingual_with_identity_chats():
    from minigpt.data.demo import demo_post_training_records

    sft = demo_post_training_records("sft", count=200)
    users = [r["conversations"][0]["content"] for r in sft]
    assert any(u.startswith("计算 ") for u in users) and any(u.startswith("Add ") for u in users)
    assert "你是谁？" in users and "Who are you?" in users
    dpo = demo_post_training_records("dpo", count=200)
    assert all(r["chosen"] != r["rejected"] for r in dpo)
    rlhf = demo_post_training_records("rlhf", count=200)
    assert all(r["reference"] for r in rlhf) and any(r["prompt"].startswith("倒序写出") for r in rlhf)


@pytest.mark.integration
def test_the_guides_sft_command_runs_on_a_fresh_clone(guide, tmp_path, monkeypatch, capsys):
    """`train.py --mode sft --config medium --auto-resume` on a fresh clone (here tiny): demo data, random init."""
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--mode", "sft", "--config", "tiny", "--auto-resume", "--max-steps", "2", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "WARNING: --mode sft found no previous stage" in out and "RANDOM weights" in out
    assert "--mode pretrain --config tiny" in out  # the better path
    assert "built-in bilingual demo data" in out
    assert (tmp_path / "checkpoints" / "sft_tiny" / "final" / "model.pt").is_file()


@pytest.mark.integration
def test_dpo_from_random_init_keeps_its_reference_across_a_resume(guide, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = str(guide / "tasks" / "dpo.jsonl")
    command = ["--mode", "dpo", "--data", data, "--auto-resume", "--save-interval", "1", *QUICK]
    assert train_cli.main([*command, "--max-steps", "2"]) == 0
    assert "WARNING: --mode dpo found no previous stage" in capsys.readouterr().out
    initial = (tmp_path / "checkpoints" / "dpo_tiny_dpo" / "initial" / "model.pt").read_bytes()
    assert train_cli.main([*command, "--max-steps", "3"]) == 0
    assert (tmp_path / "checkpoints" / "dpo_tiny_dpo" / "initial" / "model.pt").read_bytes() == initial


def test_data_lookup_order_is_cwd_then_data_dir_then_the_environment(tmp_path, monkeypatch):
    """The order `--data-dir`'s help states: working directory, then --data-dir, then $MINIGPT_DATA_DIR."""
    from minigpt.cli.train import build_parser
    from minigpt.train.run_data import DATA_ENV, DataError, find_input

    cwd, data_dir, env = (tmp_path / name for name in ("cwd", "data", "env"))
    for root in (cwd, data_dir, env):
        root.mkdir()
        (root / "corpus.txt").write_text(root.name)
    (data_dir / "only_data.txt").write_text("data")
    (env / "only_env.txt").write_text("env")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(DATA_ENV, str(env))
    assert find_input("corpus.txt", str(data_dir)).read_text() == "cwd"
    assert find_input("only_data.txt", str(data_dir)).read_text() == "data"
    assert find_input("only_env.txt", str(data_dir)).read_text() == "env"
    with pytest.raises(DataError, match=f"{cwd}, {data_dir}, {env}"):
        find_input("missing.txt", str(data_dir))
    help_text = " ".join(build_parser().format_help().split())
    assert "looked up when the working directory has no such name (then $MINIGPT_DATA_DIR)" in help_text


def test_pretokenize_holds_out_the_same_validation_share_as_train():
    from minigpt.cli.pretokenize import build_parser as pretokenize_parser

    defaults = pretokenize_parser().parse_args(["--input", "x", "--tokenizer", "t", "--out", "o"])
    assert defaults.val_fraction == TrainConfig().data.val_fraction


def test_raw_files_are_pre_tokenized_again_after_the_encoding_changes(tmp_path, demo_corpus, data_tokenizer,
                                                                       monkeypatch):
    """The cache of raw --data files is keyed by what produced the tokens, not only by the files and the
    tokenizer: after an upgrade that changes the encoding, a run does not train on the old tokens."""
    from minigpt.data import build
    from minigpt.runtime import Runtime
    from minigpt.train.run_data import resolve_run_data

    cfg = TrainConfig.of(mode="pretrain", data=[str(demo_corpus)], data_dir=str(tmp_path),
                      tokenizer=str(data_tokenizer.directory))
    first = resolve_run_data(cfg, Runtime(), None, "pretrain").dataset_dirs
    assert resolve_run_data(cfg, Runtime(), None, "pretrain").dataset_dirs == first  # reused as it is
    monkeypatch.setattr(build, "ENCODING_VERSION", build.ENCODING_VERSION + 1)
    rebuilt = resolve_run_data(cfg, Runtime(), None, "pretrain").dataset_dirs
    assert rebuilt != first and (rebuilt[0] / "train").is_dir()
