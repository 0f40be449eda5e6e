"""The export format registry: a format is one module that registers itself, and `launch/export.py`
dispatches through the registry (no per-format branch); loading the registry imports no optional package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from interop_models import random_model, save_model

from minigpt.cli import export as export_cli
from minigpt.interop import common
from minigpt.interop.common import ExportFormat, load_for_export, prepare_output, register_export_format

REPO = Path(__file__).resolve().parents[1]


def export_toy(model_dir, out, dtype="fp32", force=False) -> Path:
    """A toy format: the parameter names and shapes of the model as one JSON file."""
    out = Path(out)
    prepare_output(out, force)
    model, _tokenizer, source = load_for_export(model_dir)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    out.write_text(json.dumps({"source": str(source), "dtype": dtype, "shapes": shapes}))
    return out


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setattr(common, "EXPORT_FORMATS", dict(common.export_formats()))  # the built-ins, then the toy
    return register_export_format(ExportFormat(name="toy-json", export=export_toy, output="file",
                                               dtypes=("fp32",), description="parameter shapes as JSON"))


def test_a_format_registered_from_a_test_file_exports_through_the_cli(toy_format, data_tokenizer, tmp_path, capsys):
    run_dir = tmp_path / "run"
    save_model(run_dir / "final", random_model(data_tokenizer.vocab_size, seed=3), data_tokenizer)
    out = tmp_path / "model.json"
    assert export_cli.main(["--model", str(run_dir), "--format", "toy-json", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["source"] == str(run_dir / "final") and "embed.weight" in written["shapes"]
    assert "exported" in capsys.readouterr().out
    assert export_cli.main(["--model", str(run_dir), "--format", "toy-json", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    help_text = " ".join(export_cli.build_parser().format_help().split())
    assert "toy-json: parameter shapes as JSON" in help_text and "output directory (hf) or file (gguf, toy-json)" in help_text


def test_a_format_name_is_registered_once(toy_format):
    with pytest.raises(ValueError, match="toy-json"):
        register_export_format(ExportFormat(name="toy-json", export=export_toy, description="another"))


def test_the_builtin_formats_register_themselves():
    formats = common.export_formats()
    assert list(formats)[:2] == ["hf", "gguf"]
    assert formats["hf"].package == "safetensors" and formats["gguf"].package == "gguf"


def test_loading_the_export_cli_and_its_formats_imports_no_optional_package():
    code = ("import sys, minigpt.cli.export as cli; cli.build_parser(); "
            "print(sorted({'safetensors', 'gguf', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_export_errors_speak_the_users_language(toy_format, data_tokenizer, tmp_path, capsys, monkeypatch):
    model = save_model(tmp_path / "final", random_model(data_tokenizer.vocab_size, seed=4), data_tokenizer)
    out = tmp_path / "model.json"
    out.write_text("{}")
    monkeypatch.setenv("MINIGPT_LANG", "zh")
    assert export_cli.main(["--model", str(model), "--format", "toy-json", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"错误：{out}：已存在；请换一个 --out，或加 --force 替换它")
