"""Messages in the user's language: the language choice, and a catalog that is complete and compiled."""

import dataclasses
import gettext
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.config import TrainConfig
from minigpt.i18n import LOCALE_DIR, choose_language, docs_page

REPO = Path(__file__).resolve().parents[1]
PO = LOCALE_DIR / "zh" / "LC_MESSAGES" / "minigpt.po"


@pytest.mark.parametrize("environ,language", [
    ({}, "en"),
    ({"LANG": "zh_CN.UTF-8"}, "zh"),
    ({"LANG": "en_US.UTF-8", "LC_MESSAGES": "zh_TW.UTF-8"}, "zh"),
    ({"LANG": "zh_CN.UTF-8", "LC_ALL": "C.UTF-8"}, "en"),
    ({"LANGUAGE": "zh_CN:en", "LANG": "C"}, "zh"),
    ({"LANG": "zh_CN.UTF-8", "MINIGPT_LANG": "en"}, "en"),
    ({"LANG": "C", "MINIGPT_LANG": "zh"}, "zh"),
])
def test_language_follows_minigpt_lang_then_the_locale(environ, language):
    assert choose_language(environ) == language


def test_docs_links_follow_the_language(monkeypatch):
    monkeypatch.setenv("MINIGPT_LANG", "zh")
    assert docs_page("data.md#built-in-corpora") == "docs/zh/data.md#built-in-corpora"
    assert (REPO / "docs" / "zh" / "data.md").is_file()
    monkeypatch.setenv("MINIGPT_LANG", "en")
    assert docs_page("data.md") == "docs/data.md"


def catalog_messages() -> dict[str, str]:
    babel_pofile = pytest.importorskip("babel.messages.pofile", reason="the catalog checks need Babel (dev extra)")
    with open(PO, "rb") as handle:
        return {m.id: m.string for m in babel_pofile.read_po(handle) if m.id}


def marked_messages() -> set[str]:
    """Every `_("...")` literal under minigpt/, and the help of every training flag."""
    extract = pytest.importorskip("babel.messages.extract", reason="the catalog checks need Babel (dev extra)")
    found = {entry[2] for entry in extract.extract_from_dir(
        str(REPO / "minigpt"), method_map=[("**.py", "python")], keywords={"_": None})}
    return found | {f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def test_every_marked_message_has_a_chinese_translation():
    catalog = catalog_messages()
    missing = sorted(m for m in marked_messages() if not catalog.get(m))
    assert not missing, f"{PO.relative_to(REPO)} lacks translations of {missing[:5]}"


def test_translations_keep_the_named_fields_of_their_message():
    import string
    for message, translation in catalog_messages().items():
        fields = {name for _, name, _, _ in string.Formatter().parse(message) if name}
        assert fields == {name for _, name, _, _ in string.Formatter().parse(translation) if name}, message


def translated(catalog: gettext.GNUTranslations) -> dict[str, str]:
    return {message: text for message, text in catalog._catalog.items() if message}  # the header aside


def test_the_compiled_catalog_is_the_po_file_compiled():
    mofile = pytest.importorskip("babel.messages.mofile", reason="the catalog checks need Babel (dev extra)")
    pofile = pytest.importorskip("babel.messages.pofile")
    import io
    with open(PO, "rb") as handle:
        fresh = io.BytesIO()
        mofile.write_mo(fresh, pofile.read_po(handle))
    fresh.seek(0)
    with open(PO.with_suffix(".mo"), "rb") as handle:
        shipped = gettext.GNUTranslations(handle)
    assert translated(shipped) == translated(gettext.GNUTranslations(fresh)), \
        "minigpt.mo is stale: run python -m minigpt.i18n compile"


def test_no_message_is_formatted_before_it_is_translated():
    """`_(f"...")` or `_("..." % x)` would look up a string no catalog holds."""
    import re
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "minigpt").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\b_\(\s*f[\"']", line) or re.search(r"\b_\([^)]*[\"']\s*%", line)]
    assert not offenders, offenders


@pytest.mark.parametrize("lang,expected", [("zh", "要训练的优化器步数（默认：1000）"),
                                           ("en", "optimizer steps to train (default: 1000)")])
def test_train_help_speaks_the_users_language(lang, expected):
    result = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "MINIGPT_LANG": lang, "COLUMNS": "400"})
    assert result.returncode == 0 and expected in result.stdout, result.stdout[-2000:]


COMMON_MISTAKES = [
    (["--max_steps", "5"], "unrecognized argument --max_steps (did you mean --max-steps?)",
     "无法识别的参数 --max_steps（你是不是想用 --max-steps？）"),
    (["--config", "tinyy"], "--config must be one of", "--config 必须是"),
    (["--max-time", "90"], "give a unit (e.g. 90s or 90m)", "请带上单位（例如 90s 或 90m）"),
    (["--learning-rate", "0"], "--learning-rate must be positive, got 0", "--learning-rate 必须是正数，实际是 0"),
]


@pytest.mark.parametrize("argv,english,chinese", COMMON_MISTAKES, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_common_mistakes_are_explained_in_the_users_language(argv, english, chinese):
    for lang, expected in (("en", english), ("zh", chinese)):
        result = subprocess.run([sys.executable, "launch/train.py", *argv, "--dry-run"], cwd=REPO, text=True,
                                capture_output=True, env={**os.environ, "MINIGPT_LANG": lang})
        assert result.returncode == 2 and expected in result.stderr, (lang, result.stderr[-1500:])
        assert "Traceback" not in result.stderr


def test_modules_that_translate_never_rebind_the_translation_function():
    """`a, _, b = text.partition(...)` in a function of a module that imports `_` makes every `_()` call in
    that function an UnboundLocalError, found only when the message is due."""
    import ast
    offenders = []
    for path in sorted((REPO / "minigpt").rglob("*.py")):
        source = path.read_text()
        if "from minigpt.i18n import _" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


# Modules whose messages are English on purpose, and why.
ENGLISH_BY_DESIGN = {
    "minigpt/serve/openai_api.py": "HTTP error bodies of the OpenAI-compatible API: clients parse them, and "
                                   "OpenAI's own are English",
    "minigpt/i18n.py": "the catalog tool's own usage line",
}
PROGRAMMING_ERRORS = {"AssertionError", "NotImplementedError", "TypeError"}
"""Exceptions that report a bug in the calling code, not a user's mistake: not translated."""
WIRE_FORMAT_ERRORS = {"APIError"}
"""Exceptions whose message is an HTTP error body of the OpenAI-compatible API, wherever the server raises
them (`minigpt/serve/`): English, as for openai_api.py in ENGLISH_BY_DESIGN."""


def _is_message(node) -> bool:
    """A literal message: a string with letters, an f-string, a concatenation or .format of them."""
    import ast
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and any(c.isalpha() for c in node.value)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_message(node.left) or _is_message(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _is_message(node.func.value)
    return False


def untranslated_messages(path: Path) -> list[str]:
    """Lines of `path` that raise, print, warn or log a literal message not passed through `_()`."""
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        message = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in PROGRAMMING_ERRORS | WIRE_FORMAT_ERRORS:
                message = node.exc.args[0]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in ("print", "warn", "warning", "error", "info"):
                message = node.args[0]
        if message is not None and _is_message(message):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_message_a_user_reads_is_translated():
    """Errors, warnings, hints and progress lines go through `_()` (see ENGLISH_BY_DESIGN for the exceptions)."""
    offenders = [line for path in sorted((REPO / "minigpt").rglob("*.py"))
                 if str(path.relative_to(REPO)) not in ENGLISH_BY_DESIGN
                 for line in untranslated_messages(path)]
    assert not offenders, f"{len(offenders)} messages not marked with _(): {offenders[:20]}"


def test_hints_link_the_docs_in_the_users_language():
    """A message that points at a docs page says it through docs_page(), so Chinese users get docs/zh/."""
    import re
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "minigpt").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"[\"'][^\"']*\bdocs/[a-z_]+\.md", line)]
    assert not offenders, offenders
