"""What `pip install` puts into site-packages: the `minigpt` package only, with console scripts inside it."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def installed_packages() -> list[str]:
    """The packages setuptools' `find` collects with this project's settings (what a wheel would hold)."""
    from setuptools import find_packages

    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    return find_packages(where=str(ROOT), include=find.get("include", ("*",)), exclude=find.get("exclude", ()))


def test_only_minigpt_is_installed_as_a_top_level_package():
    packages = installed_packages()
    assert "minigpt" in packages and "minigpt.cli" in packages
    assert {name.split(".")[0] for name in packages} == {"minigpt"}, packages


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_script_targets_import_from_the_package(script):
    target = PYPROJECT["project"]["scripts"][script]
    module, _, function = target.partition(":")
    assert module.split(".")[0] == "minigpt", target
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("script", ["launch/train.py", "launch/generate.py", "launch/chat.py", "launch/serve.py",
                                    "launch/eval.py", "launch/export.py", "launch/debug_fullstack.py",
                                    "data_tools/train_tokenizer.py", "data_tools/pretokenize.py",
                                    "data_tools/make_tasks.py"])
def test_checkout_scripts_still_run_by_path(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")


UNDECLARED_IMPORTS = ROOT.parent / "shared" / "tools" / "undeclared_imports.py"


def repository_files() -> list[str]:
    """The checkout's own files (tracked, or new and not ignored): never what benchmarks or runs generate
    under ignored folders such as bench/out/ (a DeepSpeed checkpoint there ships its own zero_to_fp32.py)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the repository's own files cannot be told from generated ones")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=60)
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


@pytest.mark.skipif(not UNDECLARED_IMPORTS.is_file(), reason=f"{UNDECLARED_IMPORTS} not found (../shared is absent)")
def test_every_third_party_import_is_declared_in_pyproject(tmp_path):
    """A package the code, tests or benches import but pyproject.toml does not declare works on the machine
    that has it by hand and fails at collection on a fresh one (hypothesis did). The check reads a copy of the
    repository's own files, so what a benchmark left in bench/out/ cannot fail it."""
    for name in repository_files():
        if name == "pyproject.toml" or name.endswith(".py"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    result = subprocess.run([sys.executable, str(UNDECLARED_IMPORTS), str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
