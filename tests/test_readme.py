"""The README cannot silently rot: its quick start runs as written, its CLI table matches the code, every
command in the docs (English and Chinese) uses flags the CLIs accept, and the Chinese pages keep the English
pages' headings, code and quick start."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import shlex
import subprocess
import tokenize
from pathlib import Path

import pytest

from minigpt.cli.args import train_config_from_args
from minigpt.config import PRESETS, ConfigError, MiniGPTConfig, TrainConfig, config_flags, flag_of

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def quickstart_command(name: str) -> str:
    match = re.search(rf"<!-- quickstart:{name} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert match, f"README.md has no quickstart:{name} block"
    return match.group(1).strip()


def test_cli_reference_lists_every_train_flag_with_its_default():
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| .*? \| `(.*?)` \|$", README, re.M))
    for field in [field for _title, _cls, fields in config_flags() for field in fields]:
        flag = flag_of(field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert flag in rows, f"README CLI reference lacks {flag}"
        assert rows[flag] == repr(default), f"README says {flag} defaults to {rows[flag]}, code says {default!r}"


def test_ci_runs_both_quick_start_commands_in_a_fresh_virtual_environment():
    assert "pytest --integration" in quickstart_command("tests")
    ci = (REPO / ".ci" / "run").read_text()
    assert "quickstart main" in ci and "quickstart tests" in ci
    venv = ci.index("-m venv")
    assert venv < ci.index('eval "$main_cmd"') < ci.index('eval "$test_cmd"')


# The English main job is not repeated here: `.ci/run` runs it verbatim in a fresh environment first.
@pytest.mark.integration
@pytest.mark.parametrize("block,run_name,prompt", [("main-zh", "pretrain_tiny_zh", "床前明月光")])
def test_quick_start_main_job_runs_end_to_end(tmp_path, block, run_name, prompt):
    """README.zh-CN.md's main job as written (its install step excepted: this environment is installed
    already): Chinese demo corpus, tokenizer, shards, pretraining, and whole characters generated."""
    command = quickstart_command(block)
    install, _, job = command.partition(" && ")
    assert install.startswith("pip install")
    # Run in a scratch directory so the user's own checkpoints/ and data/ are never touched.
    for name in ("launch", "minigpt"):
        (tmp_path / name).symlink_to(REPO / name)
    result = subprocess.run(job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "checkpoints" / run_name
    for produced in ("tokenizer/tokenizer.model", "final/model.pt", "final/config.json", "metrics.jsonl",
                     "training_config_snapshot.json", "dataset_stats.json", "latest"):
        assert (run_dir / produced).exists(), produced
    # The generator prints the prompt and its continuation after training's last line.
    generated = result.stdout.rsplit("consolidated weights in", 1)[-1]
    assert prompt in generated, generated[-2000:]
    continuation = generated.split(prompt, 1)[1]
    assert len(continuation.strip()) > 10, generated[-2000:]
    assert "\ufffd" not in continuation, generated[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Every command in the docs, English and Chinese, uses flags the CLIs accept; the Chinese pages keep the
# English pages' structure (headings, code blocks, quick start) so the two cannot drift apart silently.

README_ZH = REPO / "README.zh-CN.md"
DOCS = REPO / "docs"
ZH_DOCS = DOCS / "zh"
ENGLISH_PAGES = sorted(DOCS.glob("*.md"))
ALL_PAGES = [REPO / "README.md", README_ZH, *ENGLISH_PAGES, *sorted(ZH_DOCS.glob("*.md"))]
CLI_MODULES = {"launch/train.py": "train", "launch/generate.py": "generate", "launch/chat.py": "chat",
               "launch/serve.py": "serve", "launch/eval.py": "eval", "launch/export.py": "export",
               "launch/debug_fullstack.py": "debug_fullstack", "data_tools/train_tokenizer.py": "train_tokenizer",
               "data_tools/pretokenize.py": "pretokenize", "data_tools/make_tasks.py": "make_tasks"}
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, indentation removed."""
    return [(lang, "\n".join(line[len(indent):] for line in body.splitlines()))
            for indent, lang, body in FENCE.findall(text)]


def prose(text: str) -> str:
    return FENCE.sub("", text)


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:[.,]\d+)*", prose(text)))


def code_spans(text: str) -> set[str]:
    return {" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text))}


def headings(text: str) -> list[str]:
    """Level marks of every level-2/3 heading outside code blocks, in order."""
    return re.findall(r"^(###?) ", prose(text), re.M)


def without_comments(lang: str, body: str) -> object:
    """What must not change in a translation: bash and Python without comments, other blocks as written."""
    if lang == "bash":
        lines = body.replace("\\\n", " ").splitlines()
        return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]
    if lang == "python":
        tokens = tokenize.generate_tokens(io.StringIO(body + "\n").readline)
        return [t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    if lang == "":
        # Layouts and diagrams: the same lines naming the same things; a description set off by two or more
        # spaces after them may be translated.
        return [re.split(r"\s{2,}", line.strip())[0] for line in body.splitlines()]
    return body


def accepted_flags(script: str) -> set[str]:
    """Every --flag the script's argparse parser knows, read from its own --help."""
    module = importlib.import_module(f"minigpt.cli.{CLI_MODULES[script]}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        # build_parser where the CLI has one: train's main() installs signal handlers first.
        (module.build_parser().parse_args if hasattr(module, "build_parser") else module.main)(["--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", out.getvalue()))


def submit_flags() -> set[str]:
    return set(re.findall(r"^\s+(--[a-z-]+)(?:=\*)?\)", (REPO / "slurm" / "submit.sh").read_text(), re.M))


def documented_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for every invocation of a project CLI in a bash block or an inline span."""
    lines = []
    for lang, body in code_blocks(text):
        if lang == "bash":
            lines += body.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:python|deepspeed|OMP\S+ python) [^`]+)`", prose(text))
    found = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
        starts = [0] + [i + 1 for i, token in enumerate(tokens) if token in ("&&", ";", "||", "|")]
        ends = [i for i, token in enumerate(tokens) if token in ("&&", ";", "||", "|")] + [len(tokens)]
        for words in (tokens[start:end] for start, end in zip(starts, ends, strict=True)):
            for i, word in enumerate(words):
                if word in CLI_MODULES:
                    found.append((word, words[i + 1:]))
                elif word == "slurm/submit.sh":
                    found.append((word, words[i + 1:]))
                elif word.startswith("slurm/") and word.endswith(".sbatch"):
                    found.append(("launch/train.py", words[i + 1:]))
    return found


def test_every_documented_command_uses_flags_the_cli_accepts():
    flags = {script: accepted_flags(script) for script in CLI_MODULES}
    flags["slurm/submit.sh"] = submit_flags()
    seen = set()
    for page in ALL_PAGES:
        for script, args in documented_commands(page.read_text()):
            if script == "slurm/submit.sh" and "--" in args:
                script_args, train_args = args[:args.index("--")], args[args.index("--") + 1:]
                checks = [(script, script_args), ("launch/train.py", train_args)]
            else:
                checks = [(script, args)]
            for name, argv in checks:
                seen.add(name)
                unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in flags[name]]
                assert not unknown, f"{page.relative_to(REPO)}: {name} {' '.join(argv)}: unknown flag(s) {unknown}"
                if name == "launch/train.py":
                    parser = importlib.import_module("minigpt.cli.train").build_parser()
                    try:
                        train_config_from_args(parser.parse_args(argv))
                    except (ConfigError, SystemExit) as err:
                        pytest.fail(f"{page.relative_to(REPO)}: launch/train.py {' '.join(argv)}: {err}")
    assert {"launch/train.py", "launch/generate.py", "launch/chat.py", "launch/serve.py", "launch/eval.py",
            "launch/export.py", "data_tools/pretokenize.py", "slurm/submit.sh"} <= seen


def zh_quickstart_command(name: str) -> str:
    match = re.search(rf"<!-- quickstart:{name} -->\s*```bash\n(.+?)\n```", README_ZH.read_text(), re.S)
    assert match, f"README.zh-CN.md has no quickstart:{name} block"
    return match.group(1).strip()


def test_chinese_readme_leads_with_the_chinese_job_and_keeps_both_byte_identical():
    assert "--data demo:zh" in quickstart_command("main-zh") and "床前明月光" in quickstart_command("main-zh")
    assert zh_quickstart_command("main") == quickstart_command("main-zh")
    assert zh_quickstart_command("main-en") == quickstart_command("main")
    assert zh_quickstart_command("tests") == quickstart_command("tests")
    zh = README_ZH.read_text()
    assert "README.zh-CN.md" in README.split("\n## ", 1)[0], "README.md must link the Chinese README at its top"
    assert "(README.md)" in zh.split("\n## ", 1)[0], "README.zh-CN.md must link back to README.md at its top"


def test_chinese_readme_cli_reference_lists_every_train_flag_with_its_default():
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| .*? \| `(.*?)` \|$", README_ZH.read_text(), re.M))
    english = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| .*? \| `(.*?)` \|$", README, re.M))
    assert rows == english


def twins() -> list[tuple[Path, Path]]:
    return [(REPO / "README.md", README_ZH)] + [(page, ZH_DOCS / page.name) for page in ENGLISH_PAGES]


@pytest.mark.parametrize("english,chinese", twins(), ids=lambda p: str(p.relative_to(REPO)))
def test_chinese_page_has_the_english_pages_headings_code_and_figures(english, chinese):
    assert chinese.exists(), f"{english.relative_to(REPO)} has no Chinese twin {chinese.relative_to(REPO)}"
    en, zh = english.read_text(), chinese.read_text()
    assert headings(zh) == headings(en), f"{chinese.name}: level-2/3 headings differ from {english.name}"
    en_blocks, zh_blocks = code_blocks(en), code_blocks(zh)
    if english.name == "README.md":  # each README leads with the quick-start job in its own language
        en_blocks, zh_blocks = sorted(en_blocks), sorted(zh_blocks)
    assert [lang for lang, _ in zh_blocks] == [lang for lang, _ in en_blocks]
    for (lang, en_body), (_, zh_body) in zip(en_blocks, zh_blocks, strict=True):
        assert without_comments(lang, zh_body) == without_comments(lang, en_body), \
            f"{chinese.relative_to(REPO)}: a code block differs from {english.name}:\n{zh_body}"
    # The same facts: every figure of the prose, and every inline code span (flags, paths, names, errors).
    assert numbers(zh) == numbers(en), f"{chinese.relative_to(REPO)}: figures differ from {english.name}: " \
        f"only in English {sorted(numbers(en) - numbers(zh))}, only in Chinese {sorted(numbers(zh) - numbers(en))}"
    missing = code_spans(en) - code_spans(zh)
    assert not missing, f"{chinese.relative_to(REPO)} lacks inline code of {english.name}: {sorted(missing)}"
    # Written in Chinese: every paragraph and list item of prose (tables, headings, images aside) holds Chinese.
    paragraphs = re.split(r"\n\s*\n|\n(?=\s*- )", prose(zh))
    english_left = [p.strip() for p in paragraphs if p.strip() and not p.lstrip().startswith(("#", "|", "<!--", "!["))
                    and not re.search(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]", p)]
    assert not english_left, f"{chinese.relative_to(REPO)}: untranslated paragraphs: {english_left[:3]}"


def test_relative_links_in_the_docs_point_at_files_that_exist():
    for page in ALL_PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose(page.read_text())):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}, which is missing"


@pytest.mark.parametrize("page", [DOCS / "model.md", ZH_DOCS / "model.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_model_page_lists_every_config_field_and_preset_with_exact_counts(page):
    text = page.read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| `(.*?)` \|", text, re.M))
    for field in dataclasses.fields(MiniGPTConfig):
        assert field.name in rows, f"{page.name} lacks MiniGPTConfig.{field.name}"
        assert rows[field.name] == repr(field.default), f"{page.name}: {field.name} default {rows[field.name]}"
    for name, config in PRESETS.items():
        assert re.search(rf"^\| `{name}` \| {config.num_params():,} \|", text, re.M), \
            f"{page.name} lacks preset {name} with {config.num_params():,} parameters"


@pytest.mark.parametrize("page,word", [(DOCS / "data.md", "defaults? to"), (ZH_DOCS / "data.md", "默认")],
                         ids=["docs/data.md", "docs/zh/data.md"])
def test_data_page_states_the_validation_share_defaults_the_code_has(page, word):
    text = " ".join(page.read_text().split())
    pretokenize = importlib.import_module("minigpt.cli.pretokenize").build_parser().get_default("val_fraction")
    for script, default in (("data_tools/pretokenize.py", pretokenize),
                            ("launch/train.py", TrainConfig().data.val_fraction)):
        stated = re.search(rf"`{script} --val-fraction`.*?(?:{word}) ([0-9]+(?:\.[0-9]+)?)", text)
        assert stated, f"{page.name} does not state the default of {script} --val-fraction"
        assert float(stated.group(1)) == default, f"{page.name}: {script} --val-fraction defaults to {default}"
