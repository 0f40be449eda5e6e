"""Multi-turn terminal chat: history in the chat template, commands, whole-turn dropping, Chinese, stdin scripts."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_model import shared_chat_model

from minigpt.chat import ChatSession, Turn
from minigpt.generate import GenerationConfig, TextGenerator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return shared_chat_model(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(model_dir) -> TextGenerator:
    return TextGenerator.from_dir(model_dir)


def greedy(max_new_tokens: int = 40) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)


def test_the_answer_depends_on_the_kept_history(generator):
    session = ChatSession(generator, greedy())
    assert "".join(session.reply("Hi")) == "Hello there, how are you?"
    assert "".join(session.reply("All")) == "Speak, speak."  # learned only after the greeting
    session.reset()
    assert "".join(session.reply("All")) == "We are accounted poor citizens."
    session.reset()
    session.system_prompt = "Be brief."
    assert "".join(session.reply("Hi")) == "Hi."


def test_oldest_whole_turns_are_dropped_when_the_answer_would_not_fit(generator):
    # max_seq_len 96: "Hi" + its answer + "All" is 55 prompt tokens, too many with 45 kept for the answer.
    session = ChatSession(generator, greedy(max_new_tokens=45), system_prompt="Be brief.")
    session.turns = [Turn("Hi", "Hello there, how are you?")]
    ids, dropped = session.prompt_ids("All")
    assert dropped == 1
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "All"}]
    assert ids == generator.tokenizer.encode_chat(expected, add_generation_prompt=True).ids
    session.system_prompt = ""
    assert "".join(session.reply("All")) == "We are accounted poor citizens."  # the greeting is forgotten
    assert session.dropped_turns == 1 and session.turns == [Turn("All", "We are accounted poor citizens.")]
    with_room = ChatSession(generator, greedy(max_new_tokens=40))
    with_room.turns = [Turn("Hi", "Hello there, how are you?")]
    assert with_room.prompt_ids("All")[1] == 0


def test_chinese_answers_stream_in_whole_characters(generator):
    pieces = list(ChatSession(generator, greedy()).reply("你好"))
    assert "".join(pieces) == "你好，世界。天下大势，分久必合。"
    assert len(pieces) > 5 and all("\ufffd" not in piece for piece in pieces)


def test_a_message_too_long_for_the_context_is_refused(generator):
    session = ChatSession(generator, greedy())
    with pytest.raises(ValueError, match="the model's context is 96 tokens"):
        list(session.reply("speak " * 100))
    assert session.turns == []


def test_chat_script_on_stdin_keeps_history_and_obeys_commands(model_dir, monkeypatch, capsys):
    from minigpt.cli.chat import main

    script = "\n".join(["Hi", "All", "/reset", "All", "/system Be brief.", "/reset", "Hi", "/system",
                        "speak " * 100, "/nonsense", "/exit", "Hi"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["--model", str(model_dir), "--greedy", "--max-new-tokens", "40"]) == 0
    out, notices = capsys.readouterr()
    assert out.splitlines() == ["Hello there, how are you?", "Speak, speak.", "We are accounted poor citizens.",
                                "Hi."]  # nothing after /exit
    assert notices.count("[conversation reset]") == 2 and "[system prompt removed]" in notices
    assert "the model's context is 96 tokens" in notices and "[unknown command /nonsense" in notices


def test_piped_input_that_is_not_utf8_stops_the_chat_with_one_line_naming_it(model_dir, monkeypatch, capsys):
    from minigpt.cli.chat import main

    piped = io.TextIOWrapper(io.BytesIO("Hi\n你好\n".encode() + b"caf\xe9\nHi\n"), encoding="utf-8",
                             errors="surrogateescape")  # what a C-locale Python gives stdin
    monkeypatch.setattr(sys, "stdin", piped)
    assert main(["--model", str(model_dir), "--greedy", "--max-new-tokens", "40"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "Hello there, how are you?" and len(out.splitlines()) == 2  # lines 1-2 answered
    assert err.strip().splitlines()[-1] == ("error: stdin line 3: not valid UTF-8 (byte 0xe9 at column 4); the "
                                            "message was not sent")


@pytest.mark.integration
def test_launch_chat_streams_chinese_from_a_piped_stdin_as_valid_utf8(model_dir):
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "launch/chat.py", "--model", str(model_dir), "--greedy",
                             "--max-new-tokens", "40"], input="你好\nHi\n".encode(), capture_output=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    answers = result.stdout.decode("utf-8").splitlines()  # strict: a broken UTF-8 sequence would raise
    assert answers[0] == "你好，世界。天下大势，分久必合。" and len(answers) == 2


def test_chat_cli_names_a_bad_model_dir_in_one_line(tmp_path, capsys):
    from minigpt.cli.chat import main

    (tmp_path / "model").mkdir()
    assert main(["--model", str(tmp_path / "model")]) == 2
    assert "config.json: missing" in capsys.readouterr().err
