"""Flags are taken only as written, and a mistyped or foreign flag is answered with the flag it meant."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = sorted(p.stem for p in (REPO / "minigpt" / "cli").glob("*.py") if p.stem not in ("__init__", "args"))


def train_parser():
    return importlib.import_module("minigpt.cli.train").build_parser()


def parse_error(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("typed, meant", [("--max_steps", "--max-steps"), ("--max-step", "--max-steps"),
                                          ("--lr", "--learning-rate"), ("--bs", "--batch-size"),
                                          ("--batch_size", "--batch-size"), ("--output_dir", "--out"),
                                          ("--learning-rat", "--learning-rate")])
def test_train_names_the_flag_a_typo_or_another_tools_name_meant(typed, meant, capsys):
    err = parse_error(train_parser().parse_args, [typed, "5"], capsys)
    assert err.startswith("launch/train.py: error: ") and f"{typed} (did you mean {meant}?)" in err


def test_an_abbreviation_is_not_taken_as_the_full_flag(capsys):
    assert train_parser().parse_args(["--max-steps", "5"]).max_steps == 5
    parse_error(train_parser().parse_args, ["--max-step", "5"], capsys)
    generate = importlib.import_module("minigpt.cli.generate").build_parser()
    err = parse_error(generate.parse_args, ["--model", "m", "--prompt", "p", "--max-new", "9"], capsys)
    assert "--max-new (did you mean --max-new-tokens?)" in err


def test_a_flag_with_nothing_close_is_named_alone(capsys):
    err = parse_error(train_parser().parse_args, ["--zzzz", "--max-steps", "5"], capsys)
    assert "unrecognized argument --zzzz; see --help" in err


def test_a_suggestion_is_only_a_flag_the_parser_has(capsys):
    generate = importlib.import_module("minigpt.cli.generate").build_parser()
    err = parse_error(generate.parse_args, ["--model", "m", "--prompt", "p", "--lr", "1"], capsys)
    assert "learning-rate" not in err


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_refuses_abbreviations_and_suggests(module, capsys):
    """Each CLI (launch/*.py and data_tools/*.py are thin scripts over these) uses the shared parser."""
    main = importlib.import_module(f"minigpt.cli.{module}").main
    err = parse_error(main, ["--hel"], capsys)
    assert "--hel (did you mean --help?)" in err


def test_every_other_argparse_parser_in_the_project_refuses_abbreviations():
    scripts = [p for folder in ("bench", "slurm", "launch", "data_tools") for p in (REPO / folder).glob("*.py")]
    for path in scripts:
        for call in re.findall(r"ArgumentParser\([^)]*", path.read_text()):
            assert "allow_abbrev=False" in call, path


def test_train_main_called_in_process_gives_the_stop_signals_back(capsys):
    """launch/train.py's main catches SIGINT/SIGTERM for the run; called in-process (a notebook, a test) it
    restores what was there, whether the run ends or the command line is refused, so a later Ctrl-C works."""
    import signal

    from minigpt.cli import train as train_cli

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    parse_error(train_cli.main, ["--max_steps", "1"], capsys)
    assert {sig: signal.getsignal(sig) for sig in before} == before
