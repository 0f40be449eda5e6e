"""Turn a run's `--data` / `--tokenizer` into a tokenizer and train/validation datasets.

`--data` names shard directories (built by `data_tools/pretokenize.py`) or raw .txt/.jsonl/.parquet files,
which are pre-tokenized on the fly (cleaned as --dedup/--min-chars/--max-repeated-lines ask) into a cache keyed
by their content, the tokenizer and those settings. Relative
names are looked up in the working directory, then the run's `--data-dir`, then `$MINIGPT_DATA_DIR`.
With no `--data`, pretraining uses the built-in English demo corpus (`--data demo:zh` names the Chinese
one) and the post-training modes the built-in bilingual demo data (`minigpt.data.demo`). In a multi-rank run the main rank builds
what is missing while the others wait at a barrier of the runtime (created before the data, so a
process group exists); every rank passes the same barriers whichever branch it takes.

A weighted mixture (`--data NAME=PATH:WEIGHT`, `minigpt.data.mixture`) resolves each source's PATH the
same way into a dataset of its own (raw files of a source are tokenized into a cache of their own), so the
sampler can draw from each in its share.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt.config import ConfigError, TrainConfig, data_name, get_config
from minigpt.data import build
from minigpt.data.build import build_dataset
from minigpt.data.cleaning import Cleaning
from minigpt.data.demo import (
    CORPORA,
    DEMO_PREFIX,
    DEMO_TASKS,
    TOKENIZER_SAMPLE,
    demo_language,
    write_demo_corpus,
    write_demo_post_training,
    write_tokenizer_text,
)
from minigpt.data.mixture import WeightedSource, data_paths, parse_mixture
from minigpt.data.shards import open_shard
from minigpt.i18n import _, docs_page
from minigpt.modes import mode_names, objective_class
from minigpt.runtime import Runtime
from minigpt.tokenizer import Tokenizer
from minigpt.tokenizer_training import train_tokenizer

DATA_ENV = "MINIGPT_DATA_DIR"
DEMO_NAMES = {"en": "English demo corpus", "zh": "Chinese demo corpus"}
"""Said through `_()` where used (the language is the one at use, not at import)."""
CACHE = "cache"


class DataError(ValueError):
    """Data that cannot be found or does not fit the run; the message names it."""


@dataclass
class MixtureSource:
    """One weighted source of a mixture, resolved: its name, weight and shard dataset directory."""

    name: str
    weight: float
    dataset_dir: Path


@dataclass
class RunData:
    tokenizer: Tokenizer
    dataset_dirs: list[Path]
    """Shard dataset directories (each with train/ and val/)."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """The weighted sources, in --data order (their directories are `dataset_dirs`); [] without weights."""


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and (path / "train").is_dir()


def find_input(name: str, data_dir: str) -> Path:
    """Resolve one `--data` entry: absolute, else cwd, then --data-dir, then $MINIGPT_DATA_DIR."""
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if candidate.exists():
            return candidate
        raise DataError(_("--data {name}: no such file or directory").format(name=name))
    searched = [Path.cwd(), Path(data_dir)]
    if os.environ.get(DATA_ENV):
        searched.append(Path(os.environ[DATA_ENV]))
    for root in searched:
        if (root / candidate).exists():
            return root / candidate
    raise DataError(_("--data {name}: not found in {searched} (set --data-dir or ${env} to where your data "
                      "lives)").format(name=name, searched=", ".join(str(r) for r in searched), env=DATA_ENV))


def _builtin_language(name: str) -> str:
    """The language of a `--data demo:LANG` entry; a `DataError` naming the choices for an unknown one."""
    try:
        return demo_language(name)
    except ValueError as err:
        raise DataError(_("--data {error}").format(error=err)) from None


def check_mixture_mode(cfg: TrainConfig) -> list[WeightedSource]:
    """The run's weighted sources ([] without weights); a `ConfigError` naming the mode when its objective
    cannot mix sources."""
    mixture = parse_mixture(cfg.data.sources)
    if mixture and not objective_class(cfg.mode).mixes_sources:
        mixing = ", ".join(mode for mode in mode_names() if objective_class(mode).mixes_sources)
        raise ConfigError(_("--mode {mode} cannot train on a weighted mixture (--data NAME=PATH:WEIGHT); modes that "
                            "can: {modes}. Give its data without names and weights").format(mode=cfg.mode,
                                                                                           modes=mixing))
    return mixture


def planned_inputs(cfg: TrainConfig) -> list[Path | str]:
    """What `resolve_run_data` will read, found but not built: paths, and built-in corpora by name."""
    check_mixture_mode(cfg)
    planned: list[Path | str] = []
    for name in data_paths(cfg.data.sources):
        if name.startswith(DEMO_PREFIX):
            planned.append(_("<built-in {corpus} ({name})>").format(corpus=_(DEMO_NAMES[_builtin_language(name)]),
                                                                    name=name))
        else:
            planned.append(find_input(name, cfg.data.data_dir))
    pretraining = objective_class(cfg.mode).dataset_kind == "pretrain"
    return planned or [_("<built-in demo corpus>") if pretraining else _("<built-in bilingual demo data>")]


def demo_post_training_file(data_dir: str | Path, kind: str, tasks: int | None = None, write: bool = True) -> Path:
    """`<data-dir>/cache/demo/<kind>-<tasks>.jsonl`: the built-in post-training data of `kind` with `tasks` tasks
    (default `DEMO_TASKS[kind]`), written if missing (and `write`). The count is in the name, so a cache written
    by a release with other counts is never read as today's data."""
    tasks = DEMO_TASKS[kind] if tasks is None else tasks
    demo = Path(data_dir) / CACHE / "demo" / f"{kind}-{tasks}.jsonl"
    if write and not demo.exists():
        write_demo_post_training(demo, kind, tasks)
    return demo


def tokenizer_text_file(data_dir: str | Path) -> Path:
    """`<data-dir>/cache/demo/sft-tokenizer-<tasks>.txt`: what a tokenizer for a built-in corpus learns of the
    built-in SFT data (`minigpt.data.demo.tokenizer_text`), written if missing."""
    path = Path(data_dir) / CACHE / "demo" / f"sft-tokenizer-{TOKENIZER_SAMPLE}.txt"
    if not path.exists():
        write_tokenizer_text(path, TOKENIZER_SAMPLE)
    return path


def builtin_corpus_file(data_dir: str | Path, language: str, write: bool = True) -> Path:
    """`<data-dir>/cache/demo/corpus.txt` or `zh_classics.jsonl`: the built-in corpus of `language`, written if
    missing (and `write`)."""
    demo = Path(data_dir) / CACHE / "demo" / CORPORA[language]
    if write and not demo.exists():
        write_demo_corpus(demo, language)
    return demo


def _builtin_input(cfg: TrainConfig, runtime: Runtime, kind: str, name: str | None) -> Path:
    """The file of a built-in corpus (`demo:en`, `demo:zh`) or, with name None, of the built-in
    post-training data of `kind`, written into the data cache by the main rank while the others wait."""
    if name is None:
        demo = demo_post_training_file(cfg.data.data_dir, kind, write=runtime.is_main)
        if runtime.is_main:
            print(_("[minigpt] no --data: --mode {mode} trains on the built-in bilingual demo data ({path}: tasks in "
                    "Chinese and English, identity chats); see {docs} for your own").format(
                mode=cfg.mode, path=demo, docs=docs_page("data.md#input-files", zh="data.md#输入文件")), flush=True)
    else:
        language = _builtin_language(name)
        if kind != "pretrain":
            raise DataError(_("--data {name} is a pretraining corpus; --mode {mode} needs {kind} records (without "
                              "--data it trains on the built-in bilingual demo data)").format(
                name=name, mode=cfg.mode, kind=kind))
        demo = builtin_corpus_file(cfg.data.data_dir, language, write=runtime.is_main)
    runtime.barrier()
    return demo


def _content_key(files: list[Path], *parts: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _pretokenized(cfg: TrainConfig, runtime: Runtime, raw: list[Path], tokenizer: Tokenizer, kind: str) -> Path:
    """The cached shard dataset of the raw files `raw`, built by the main rank if missing (the others wait)."""
    cleaning = Cleaning(cfg.data.dedup, cfg.data.min_chars, cfg.data.max_repeated_lines)
    key = _content_key(raw, tokenizer.checksum, kind, str(cfg.data.val_fraction), str(cfg.seed),
                       f"encoding {build.ENCODING_VERSION}",
                       *([json.dumps(cleaning.as_dict())] if cleaning != Cleaning() else []))
    cached = Path(cfg.data.data_dir) / CACHE / f"{kind}-{key}"
    if runtime.is_main and not cached.exists():
        print(_("[minigpt] pre-tokenizing {count} file(s) into {path}").format(count=len(raw), path=cached),
              flush=True)
        build_dataset([str(p) for p in raw], cached, tokenizer, kind=kind, val_fraction=cfg.data.val_fraction,
                      seed=cfg.seed, workers=min(4, os.cpu_count() or 1), cleaning=cleaning)
    runtime.barrier()
    return cached


def resolve_run_data(cfg: TrainConfig, runtime: Runtime, tokenizer_dir: Path | None, kind: str) -> RunData:
    """Find or build the tokenizer and the datasets this run trains on.

    tokenizer_dir: the tokenizer the weights already use (post-training stages start from weights),
    or None to use --tokenizer / <run>/tokenizer / train one on the raw inputs.
    """
    mixture = check_mixture_mode(cfg)
    entries = data_paths(cfg.data.sources)
    inputs = [_builtin_input(cfg, runtime, kind, name) if name.startswith(DEMO_PREFIX)
              else find_input(name, cfg.data.data_dir) for name in entries]
    if not inputs:
        inputs = [_builtin_input(cfg, runtime, kind, "demo:en" if kind == "pretrain" else None)]
    datasets = [p for p in inputs if _is_dataset_dir(p)]
    raw = [p for p in inputs if not _is_dataset_dir(p)]
    for path in raw:
        if path.is_dir():
            raise DataError(_("--data {path}: a directory without train/ shards; give files or a shard "
                              "directory").format(path=path))

    # The built-in chain continues on the built-in post-training data with this tokenizer: a tokenizer trained
    # for a built-in corpus learns those records too.
    builtin_corpus = kind == "pretrain" and (not entries or any(name.startswith(DEMO_PREFIX) for name in entries))
    tokenizer = _resolve_tokenizer(cfg, runtime, tokenizer_dir, raw, datasets, learn_post_training=builtin_corpus)
    sources = []
    if mixture:  # one dataset per source, raw files tokenized source by source
        datasets = [path if _is_dataset_dir(path) else _pretokenized(cfg, runtime, [path], tokenizer, kind)
                    for path in inputs]
        sources = [MixtureSource(source.name, source.weight, path)
                   for source, path in zip(mixture, datasets, strict=True)]
    elif raw:
        datasets.append(_pretokenized(cfg, runtime, raw, tokenizer, kind))
    for path in datasets:  # fail before training on a shard of another tokenizer or kind
        reader = open_shard(path, "train", tokenizer_checksum=tokenizer.checksum, vocab_size=tokenizer.vocab_size)
        if reader.kind != kind:
            raise DataError(_("{path}: shards of kind {found!r}, --mode {mode} needs {kind!r}").format(
                path=path, found=reader.kind, mode=cfg.mode, kind=kind))
    return RunData(tokenizer, datasets, sources)


MIN_COVERAGE = 0.9
"""Share of the training data's characters a tokenizer must have pieces for (--allow-low-coverage: any)."""
COVERAGE_SAMPLE = (256, 512)
"""Documents per dataset (evenly spaced over its train split) and tokens per document the coverage reads."""


def character_coverage(tokenizer: Tokenizer, dataset_dirs: list[Path]) -> tuple[float, str]:
    """The share of a sample of the training data's characters (by occurrence, spaces aside) that `tokenizer`
    has pieces for, and the most frequent characters it lacks."""
    total, uncovered = 0, collections.Counter()
    documents, tokens = COVERAGE_SAMPLE
    for directory in dataset_dirs:
        reader = open_shard(directory, "train")
        count = min(documents, reader.num_documents)
        for index in np.linspace(0, reader.num_documents - 1, count, dtype=np.int64) if count else []:
            chars, lacking = tokenizer.character_counts(document_text(tokenizer, reader.document(int(index))[:tokens]))
            total += chars
            uncovered += lacking
    coverage = 1.0 - uncovered.total() / total if total else 1.0
    return coverage, "".join(char for char, _count in uncovered.most_common(8))


def document_text(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """The text of a document as the data gave it: a conversation's turns without the chat template's role
    headers (`user`, `assistant`: the template's words, not the data's)."""
    starts = np.flatnonzero(ids == tokenizer.im_start_id)
    if not len(starts):
        return tokenizer.decode(ids.tolist())
    before, *turns = [tokenizer.decode(part.tolist()) for part in np.split(ids, starts)]
    return "\n".join([before, *(turn.partition("\n")[2] for turn in turns)])


def check_coverage(cfg: TrainConfig, run_data: RunData, inherited: bool) -> tuple[float, str | None]:
    """The tokenizer's `character_coverage` of the run's data, and a warning when it is below `MIN_COVERAGE` on
    the built-in demo data and corpora (or with --allow-low-coverage). Below it on the user's own --data: a
    `ConfigError` that says how to get a tokenizer that fits. `inherited`: the tokenizer came with the starting weights."""
    coverage, lacking = character_coverage(run_data.tokenizer, run_data.dataset_dirs)
    if coverage >= MIN_COVERAGE:
        return coverage, None
    data = " ".join(data_paths(cfg.data.sources)) or "YOUR_FILES"
    train = f"python data_tools/train_tokenizer.py --input {data} --out tokenizers/{data_name(cfg.data.sources or ['mine'])}"
    if inherited:  # weights and tokenizer go together: the fix is an earlier stage with a fitting tokenizer
        fix = _("{train}, pretrain with that --tokenizer on text in this language, then start --mode {mode} from "
                "that run with --init-from").format(train=train, mode=cfg.mode)
    else:
        fix = _("{train} and pass --tokenizer, or --retrain-tokenizer to train <out>/tokenizer on --data").format(
            train=train)
    source = _(" (from the starting weights)") if inherited else ""
    problem = _("tokenizer {tokenizer}{source} has pieces for only {coverage:.1%} of the training data's characters "
                "(at least {needed:.0%} needed; missing e.g. {lacking!r}); the rest reach the model as UTF-8 bytes. "
                "Train one that covers it: {fix}").format(
        tokenizer=run_data.tokenizer.directory, source=source, coverage=coverage, needed=MIN_COVERAGE,
        lacking=lacking, fix=fix)
    own_data = [name for name in data_paths(cfg.data.sources) if not name.startswith(DEMO_PREFIX)]
    if own_data and not cfg.data.allow_low_coverage:
        raise ConfigError(_("{problem}; or pass --allow-low-coverage to train anyway").format(problem=problem))
    return coverage, problem


def planned_vocab_size(cfg: TrainConfig) -> tuple[int, str]:
    """The vocabulary the run will have, without building anything, and where that figure comes from."""
    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer).vocab_size, _("tokenizer {path}").format(path=cfg.data.tokenizer)
    run_tokenizer = cfg.run_dir / "tokenizer"
    if run_tokenizer.exists() and not cfg.data.retrain_tokenizer:
        return Tokenizer(run_tokenizer).vocab_size, _("tokenizer {path}").format(path=run_tokenizer)
    vocab = cfg.data.vocab_size or get_config(cfg.model.preset).vocab_size
    return vocab, _("at most: a tokenizer is trained on the data (a small corpus gives fewer)")


def _resolve_tokenizer(cfg: TrainConfig, runtime: Runtime, tokenizer_dir: Path | None, raw: list[Path],
                       datasets: list[Path], learn_post_training: bool = False) -> Tokenizer:
    """The tokenizer of the starting weights, --tokenizer, <run>/tokenizer, or one trained on `raw` (and, with
    `learn_post_training`, on the built-in SFT records as well)."""
    if tokenizer_dir is not None:
        weights_tokenizer = Tokenizer(tokenizer_dir)
        # Compared by content: a copy of the same tokenizer elsewhere is the same tokenizer.
        if cfg.data.tokenizer and Tokenizer(cfg.data.tokenizer).checksum != weights_tokenizer.checksum:
            raise ConfigError(_("--tokenizer {path} differs from the tokenizer of the starting weights ({weights}); "
                                "post-training keeps the tokenizer of its weights").format(
                path=cfg.data.tokenizer, weights=tokenizer_dir))
        return weights_tokenizer
    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    run_tokenizer = cfg.run_dir / "tokenizer"
    train_one = cfg.data.retrain_tokenizer or not run_tokenizer.exists()
    runtime.barrier()  # every rank has looked before the main rank (re)writes it: all decide alike
    if not train_one:
        return Tokenizer(run_tokenizer)
    if not raw:
        checksums = {json.loads((d / "train" / "meta.json").read_text()).get("tokenizer_checksum") for d in datasets}
        raise ConfigError(_("shards {paths} were built with tokenizer {checksums}; pass that tokenizer directory with "
                            "--tokenizer").format(paths=", ".join(map(str, datasets)), checksums=checksums))
    if runtime.is_main:
        files = raw + ([tokenizer_text_file(cfg.data.data_dir)] if learn_post_training else [])
        vocab = cfg.data.vocab_size or get_config(cfg.model.preset).vocab_size
        print(_("[minigpt] training a {vocab}-token tokenizer on {count} file(s) into {path}").format(
            vocab=vocab, count=len(files), path=run_tokenizer), flush=True)
        train_tokenizer([str(p) for p in files], run_tokenizer, vocab_size=vocab)
    runtime.barrier()
    return Tokenizer(run_tokenizer)
