"""Messages in the user's language: the language choice, and a catalog that is complete and compiled."""

import gettext
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.config import config_flags
from minigpt.i18n import LOCALE_DIR, choose_language, docs_page

REPO = Path(__file__).resolve().parents[1]
PO = LOCALE_DIR / "zh" / "LC_MESSAGES" / "minigpt.po"


def run_in(lang: str, argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python argv...` in the repository with MINIGPT_LANG=`lang` (and help text unwrapped: COLUMNS=400); paths
    in `argv` are relative to the repository."""
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MINIGPT_LANG": lang, "PYTHONPATH": str(REPO), "COLUMNS": "400"})


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
    return found | {f.metadata["help"] for _title, _cls, fields in config_flags() for f in fields}


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
    result = run_in(lang, ["launch/train.py", "--help"])
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
        result = run_in(lang, ["launch/train.py", *argv, "--dry-run"])
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


# data, tokenizer, evaluation, cli


def test_a_malformed_sft_line_and_too_little_data_are_explained_in_the_users_language(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}\n'
                   '{"conversations": [{"role": "user", "content": "hi"\n', encoding="utf-8")
    expected = {"en": ("skipped 1 of 2: malformed_json: 1 (lines 2)", "error: dataset has 1 samples but one optimizer "
                       "step needs 16 (micro-batch 16 x accumulation 1 x 1 ranks)"),
                "zh": ("2 条中跳过 1 条：malformed_json：1（行号 2）", "错误：数据集只有 1 个样本，而一个优化器步需要 16 个"
                       "（微批 16 × 累积 1 × 1 个 rank）")}
    for lang, (skipped, refused) in expected.items():
        result = run_in(lang, [str(REPO / "launch/train.py"), "--mode", "sft", "--data", str(bad), "--max-steps", "1",
                               "--out", str(tmp_path / f"run_{lang}"), "--data-dir", str(tmp_path / f"data_{lang}")],
                        cwd=tmp_path)
        assert result.returncode == 2 and skipped in result.stderr and refused in result.stderr, \
            (lang, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_pretokenizing_a_file_that_is_not_utf8_is_explained_in_the_users_language(tmp_path, data_tokenizer):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n\ncrème brûlée\n".encode("latin-1"))
    expected = {"en": ("skipped 2 of 2: not_utf8: 2 (lines 1, 3)", "error: no usable pretrain examples in",
                       "docs/data.md for the formats"),
                "zh": ("2 条中跳过 2 条：not_utf8：2（行号 1, 3）", "中没有可用的 pretrain 样本", "格式说明见 docs/zh/data.md")}
    for lang, lines in expected.items():
        result = run_in(lang, ["data_tools/pretokenize.py", "--input", str(latin1), "--tokenizer",
                               str(data_tokenizer.directory), "--out", str(tmp_path / f"shards_{lang}"), "--quiet"])
        assert result.returncode == 2 and all(line in result.stderr for line in lines), (lang, result.stderr[-2000:])


@pytest.mark.parametrize("argv,english,chinese", [
    (["launch/eval.py", "--model", "m", "--task", "bogus:items.jsonl"],
     "--task bogus:items.jsonl: expected KIND:PATH[,key=value...] with KIND one of bpb, mc, tasks",
     "--task bogus:items.jsonl：格式应为 KIND:PATH[,key=value...]，KIND 取 bpb, mc, tasks 之一"),
    (["launch/eval.py", "--model", "m", "--task", "mc:items.csv,shots=5"],
     "--task mc:items.csv,shots=5: shots=5 needs dev=PATH", "--task mc:items.csv,shots=5：shots=5 需要 dev=PATH"),
    (["data_tools/make_tasks.py", "--out", "unused", "--tasks", "add,multiply"],
     "error: unknown task(s) ['multiply']; choose from", "错误：未知任务 ['multiply']；请从"),
    (["data_tools/train_tokenizer.py", "--out", "unused", "--vocab-size", "400"],
     "error: give --input FILE (repeatable) or --demo", "错误：请给出 --input FILE（可重复）或 --demo"),
    (["data_tools/train_tokenizer.py", "--input", "missing.txt", "--out", "unused", "--vocab-size", "400"],
     "error: input missing.txt: no such file", "错误：输入 missing.txt：文件不存在"),
], ids=["eval-kind", "eval-shots", "make-tasks", "tokenizer-no-input", "tokenizer-missing-input"])
def test_data_and_eval_mistakes_are_explained_in_the_users_language(argv, english, chinese):
    for lang, expected in (("en", english), ("zh", chinese)):
        result = run_in(lang, argv)
        assert result.returncode == 2 and expected in result.stderr, (lang, result.stderr[-1500:])
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("tool,english,chinese", [
    ("data_tools/pretokenize.py", "fail on the first bad record instead of skipping", "遇到第一条坏记录就失败，而不是跳过"),
    ("data_tools/train_tokenizer.py", "vocabulary size (at most; small corpora give less)", "词表大小（上限；语料小时会更少）"),
    ("data_tools/make_tasks.py", "tasks per file", "每个文件的任务数"),
    ("launch/debug_fullstack.py", "tokens of the first sample to print", "打印第一个样本的多少个 token"),
])
def test_data_tool_help_speaks_the_users_language(tool, english, chinese):
    for lang, expected in (("en", english), ("zh", chinese)):
        result = run_in(lang, [tool, "--help"])
        assert result.returncode == 0 and expected in result.stdout, (lang, result.stdout[-2000:])


def test_the_pretokenize_docs_link_follows_the_language():
    for lang, page in (("en", "docs/data.md"), ("zh", "docs/zh/data.md")):
        result = run_in(lang, ["data_tools/pretokenize.py", "--help"])
        assert page in result.stdout and (REPO / page).is_file()
# core modules

def markdown_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of `page`: lower case, punctuation dropped, spaces as hyphens."""
    import re
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if line.startswith("#")}


def test_docs_links_take_the_chinese_pages_own_anchor(monkeypatch):
    monkeypatch.setenv("MINIGPT_LANG", "zh")
    assert docs_page("data.md#input-files", zh="data.md#输入文件") == "docs/zh/data.md#输入文件"
    monkeypatch.setenv("MINIGPT_LANG", "en")
    assert docs_page("data.md#input-files", zh="data.md#输入文件") == "docs/data.md#input-files"


def test_every_docs_link_in_the_code_reaches_a_heading_in_both_languages():
    """docs_page("page.md#anchor", zh="page.md#锚点") in the code: each anchor is a heading of its page."""
    import ast
    links = []
    for path in sorted((REPO / "minigpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "docs_page" and node.args and \
                    isinstance(node.args[0], ast.Constant):
                zh = next((k.value.value for k in node.keywords if k.arg == "zh"), node.args[0].value)
                links += [(REPO / "docs", node.args[0].value), (REPO / "docs" / "zh", zh)]
    assert links, "no docs_page() call found"
    broken = [f"{root.relative_to(REPO)}/{link}" for root, link in links
              if not (root / link.partition("#")[0]).is_file()
              or ("#" in link and link.partition("#")[2] not in markdown_anchors(root / link.partition("#")[0]))]
    assert not broken, broken


@pytest.fixture(scope="module")
def resume_workspace(tmp_path_factory) -> Path:
    """A run directory and data cache shared by the resume mistakes (the tokenizer is trained once)."""
    return tmp_path_factory.mktemp("resume_mistakes")


def damaged_checkpoint(root: Path) -> Path:
    from minigpt.checkpoint import write_manifest

    checkpoint = root / "damaged" / "ckpt" / "step_0000005"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 5, ')
    write_manifest(checkpoint)
    return checkpoint


def checkpoint_of_another_version(root: Path) -> Path:
    checkpoint = damaged_checkpoint(root / "other_version")
    (checkpoint / "manifest.json").write_text('{"format_version": 2, "files": {}}')
    return checkpoint


def not_a_checkpoint(root: Path) -> Path:
    (root / "notes").mkdir(exist_ok=True)
    return root / "notes"


@pytest.mark.parametrize("make,english,chinese", [
    (not_a_checkpoint, "no checkpoint at {path}: expected a checkpoint folder, or a run directory with ckpt/step_N "
                       "folders", "{path} 处没有检查点：应为一个检查点目录，或一个含有 ckpt/step_N 目录的运行目录"),
    (damaged_checkpoint, "{path}/trainer_state.json: not valid JSON (", "{path}/trainer_state.json：不是有效的 JSON（"),
    (checkpoint_of_another_version, "{path}/manifest.json: checkpoint format version 2; this MiniGPT reads version 1",
     "{path}/manifest.json：检查点格式版本为 2；这个版本的 MiniGPT 读取的是版本 1"),
], ids=["not a checkpoint", "damaged checkpoint", "another format version"])
def test_resuming_from_a_wrong_checkpoint_is_explained_in_the_users_language(resume_workspace, make, english,
                                                                              chinese):
    resume = make(resume_workspace)
    for lang, expected in (("en", english), ("zh", chinese)):
        result = run_in(lang, ["launch/train.py", "--config", "tiny", "--max-steps", "2", "--warmup-steps", "1",
                               "--out", str(resume_workspace / "run"), "--data-dir", str(resume_workspace / "data"),
                               "--resume", str(resume)])
        assert result.returncode == 2 and expected.format(path=resume) in result.stderr, (lang, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
    assert "[minigpt] 精度" in result.stdout and "权重来自" in result.stdout, result.stdout[-1500:]
