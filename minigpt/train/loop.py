"""The training loop: one loop for every mode and both engines.

    set up (tokenizer, data, model, engine, objective, checkpoints, monitor)
    for each step: get batch -> loss -> backward -> step -> log -> maybe evaluate / save -> stop flag?
    finish: final checkpoint, consolidated weights, a sample

Mode-specific maths lives behind the `Objective` contract (`minigpt.train.objective`, registry in
`minigpt.modes`); engine specifics behind `minigpt.engine`.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from minigpt.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    recorded_precision,
    rng_state,
    set_rng_state,
    sweep_temporary,
)
from minigpt.config import PRESETS, ConfigError, MiniGPTConfig, TrainConfig, default_run_dir, get_config
from minigpt.data.build import DatasetBuildError
from minigpt.data.mixture import parse_mixture
from minigpt.data.prefetch import PrefetchingLoader, collate
from minigpt.data.sampler import MixtureSampler, ResumableSampler, SamplerError
from minigpt.data.shards import ShardError, open_shard
from minigpt.engine import create_engine, create_runtime
from minigpt.engine.base import Engine
from minigpt.engine.device import PrecisionChoice, choose_precision
from minigpt.engine.plain import PlainEngine
from minigpt.evaluation.context import EvalDataError
from minigpt.fsutil import atomic_write_text
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _
from minigpt.interop.common import is_hf_llama_dir
from minigpt.interop.hf_llama import imported_init_dir
from minigpt.metrics import MetricSums, reduce_by_name
from minigpt.model import MiniGPT
from minigpt.modes import build_objective, objective_class
from minigpt.monitor import TrainingMonitor
from minigpt.runtime import RankFailed
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED, StopRequest
from minigpt.tokenizer import Tokenizer, TokenizerError
from minigpt.train.autocompile import compile_pays, compile_unavailable
from minigpt.train.budget import WHOLE_EVAL_TIMED, TimeBudget
from minigpt.train.objective import Objective, SetupContext
from minigpt.train.run_data import (
    DataError,
    RunData,
    check_coverage,
    planned_inputs,
    planned_vocab_size,
    resolve_run_data,
)
from minigpt.train.run_dir import (
    RunDirLock,
    check_fresh_run_dir,
    lock_run_dir,
    previous_run_artefacts,
    remove_artefacts,
)
from minigpt.weights import FINAL_DIR as FINAL
from minigpt.weights import WeightsError, load_consolidated, read_consolidated_meta, save_consolidated

if TYPE_CHECKING:
    from minigpt.lora import LoraSpec, SavedAdapter

USER_ERRORS = (ConfigError, DataError, TokenizerError, CheckpointError, ShardError, WeightsError,
               DatasetBuildError, SamplerError, EvalDataError, RankFailed)
"""Errors caused by the user's input: reported as one clear line, not a traceback."""
SNAPSHOT = "training_config_snapshot.json"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ConcatWindows:
    """Several map-style datasets seen as one (index runs through them in order)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[part][index - int(self.offsets[part])]


def open_datasets(run_data: RunData, objective, split: str, seq_len: int) -> ConcatWindows:
    """The objective's map-style dataset of `split` over every dataset directory of the run."""
    parts = []
    for directory in run_data.dataset_dirs:
        reader = open_shard(directory, split, tokenizer_checksum=run_data.tokenizer.checksum,
                            vocab_size=run_data.tokenizer.vocab_size)
        parts.append(objective.dataset(reader, seq_len, run_data.tokenizer))
    return ConcatWindows(parts)


def default_sample_prompt(tokenizer: Tokenizer, dataset_dirs: list[Path], chat: bool) -> str:
    """A prompt from the run's own data, so samples read in its language: the first words of the first
    validation document, or (chat) the first user turn of its first conversation."""
    for directory in dataset_dirs:
        for split in ("val", "train"):
            reader = open_shard(directory, split)
            if not reader.num_documents:
                continue
            ids = [int(i) for i in reader.document(0)]
            if chat:
                for start in (i + 1 for i, token in enumerate(ids) if token == tokenizer.im_start_id):
                    end = ids.index(tokenizer.im_end_id, start) if tokenizer.im_end_id in ids[start:] else len(ids)
                    role, _newline, content = tokenizer.decode(ids[start:end]).partition("\n")
                    if role == "user" and content.strip():
                        return content.strip()
                continue
            text = tokenizer.decode(ids[:32]).strip().split("\n", 1)[0]
            if len(text) > 24:
                cut = text.rfind(" ", 0, 24)
                text = text[:cut] if cut > 0 else text[:12]
            if text:
                return text
    return "The"


@dataclass
class StartingWeights:
    """Where a run's initial weights come from (recorded in the snapshot)."""

    source: str
    model_dir: Path | None = None


RANDOM_INIT = "random init"
NO_PREVIOUS_STAGE = "random init (no previous stage)"
INITIAL = "initial"
"""Where a post-training run from random init keeps its starting weights (its DPO/RLHF reference)."""


def said_source(source: str) -> str:
    """Where starting weights come from as the user reads it: the recorded English of a random init (kept
    in snapshots and checkpoints as written) in the user's language, a directory as it is."""
    return _(source) if source in (RANDOM_INIT, NO_PREVIOUS_STAGE) else source


def no_previous_stage_warning(cfg: TrainConfig) -> str:
    """The loud warning of a post-training run that found no previous stage to start from."""
    stages = objective_class(cfg.mode).previous_stages
    return _("WARNING: --mode {mode} found no previous stage (checkpoints/{{{stages}}}_{config}[_DATA]/{final}) and "
             "starts from RANDOM weights: it runs, but learns far less than it would from a pretrained model. Better: "
             "python launch/train.py --mode {previous} --config {config} first (or pass --init-from DIR)").format(
        mode=cfg.mode, stages=",".join(stages), config=cfg.model.preset, final=FINAL, previous=stages[-1])


def find_starting_weights(cfg: TrainConfig) -> StartingWeights:
    """--init-from, else the previous stage's final weights of this preset; pretraining starts from scratch,
    and so, with a loud warning, does a post-training stage that has no previous stage."""
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if is_hf_llama_dir(path):  # converted once into the run directory, then used like our own weights
            return StartingWeights(str(path), imported_init_dir(path, cfg.run_dir / "init_from_hf"))
        if (path / FINAL / "model.pt").is_file():
            path = path / FINAL
        if not (path / "model.pt").is_file():
            raise ConfigError(_("--init-from {path}: no consolidated weights (model.pt) there or in {final}").format(
                path=cfg.model.init_from, final=path / FINAL))
        return StartingWeights(str(path), path)
    stages = objective_class(cfg.mode).previous_stages  # post-training stages: the previous stage's final/
    if not stages:
        return StartingWeights(RANDOM_INIT)
    for stage in stages:
        for candidate in previous_stage_dirs(stage, cfg):
            if (candidate / FINAL / "model.pt").is_file():
                return StartingWeights(str(candidate / FINAL), candidate / FINAL)
    return StartingWeights(NO_PREVIOUS_STAGE)


def previous_stage_dirs(stage: str, cfg: TrainConfig) -> list[Path]:
    """Default run directories of `stage` with this preset, in the order a stage looks for its start: with
    --data the one named after it, the newest other run on one's own data, the built-in demo data's; without
    --data the demo data's first."""
    demo = default_run_dir(stage, cfg.model.preset, [])
    own = [path for path in demo.parent.glob(f"{demo.name}_*/{FINAL}/model.pt")
           if not any(path.parts[-3].startswith(f"{stage}_{other}") for other in PRESETS if other != cfg.model.preset
                      and other.startswith(f"{cfg.model.preset}_"))]  # small_30m's runs are not small's
    newest = [path.parents[1] for path in sorted(own, key=lambda path: path.stat().st_mtime, reverse=True)]
    if not cfg.data.sources:
        return [demo, *newest]
    return list(dict.fromkeys([default_run_dir(stage, cfg.model.preset, cfg.data.sources), *newest, demo]))


def lora_spec(cfg: TrainConfig, start: StartingWeights) -> tuple[LoraSpec, SavedAdapter | None]:
    """The `LoraSpec` of the adapters --lora-rank / --lora-init train on `start`, and --lora-init's `SavedAdapter`
    (or None); refused (ConfigError) from random weights, or when --lora-init contradicts the flags given or
    was trained on another base."""
    from minigpt import lora

    adapter = cfg.adapter
    if start.model_dir is None:
        raise ConfigError(_("--lora-rank adapts trained weights, but this run starts from {source}: give --init-from "
                            "DIR (our final/, a run directory or a Hugging Face Llama directory) or train the "
                            "previous stage first").format(source=said_source(start.source)))
    try:
        if not adapter.lora_init:
            return lora.LoraSpec(adapter.lora_rank, adapter.alpha, adapter.lora_dropout,
                                 tuple(lora.resolve_targets(adapter.lora_targets))), None
        saved = lora.read_adapter(adapter.lora_init)
        spec = saved.spec
        given = (("--lora-rank", adapter.lora_rank, spec.rank), ("--lora-alpha", adapter.lora_alpha, spec.alpha),
                 ("--lora-targets", lora.resolve_targets(adapter.lora_targets) if adapter.lora_targets else None,
                  list(spec.targets)))
        for flag, mine, theirs in given:
            if mine and mine != theirs:
                raise lora.LoraError(_("--lora-init {dir} has {flag} {theirs}, not {mine}: leave {flag} out to continue "
                                       "the adapter as it was trained").format(
                    dir=saved.directory, flag=flag, theirs=theirs, mine=mine))
        if saved.base_checksum and saved.base_checksum != lora.weights_checksum(start.model_dir):
            raise lora.LoraError(_("--lora-init {dir} was trained on another base than --init-from {base} (the SHA-256 "
                                   "of the weights differs): pass the base it was trained on").format(
                dir=saved.directory, base=start.source))
    except lora.LoraError as err:
        raise ConfigError(str(err)) from None
    return lora.LoraSpec(spec.rank, spec.alpha, adapter.lora_dropout or spec.dropout, spec.targets), saved


def lora_plan(cfg: TrainConfig, start: StartingWeights, model_config: MiniGPTConfig) -> str:
    """--dry-run's line on the adapters: the run's own LoRA start line (counted on a model of the planned shape
    built on the meta device: no memory) and the adapters' AdamW state against full fine-tuning's."""
    from minigpt import lora

    spec, _saved = lora_spec(cfg, start)
    try:
        with torch.device("meta"):
            model = MiniGPT(model_config)
            total = sum(p.numel() for p in model.parameters())
            trainable = lora.attach_lora(model, spec.rank, spec.alpha, spec.dropout, list(spec.targets))
    except lora.LoraError as err:
        raise ConfigError(str(err)) from None
    note = lora.describe(trainable, total, spec.rank, spec.alpha, list(spec.targets))
    return _("adapters        {note}; AdamW state {adapters:.1f} MB (full fine-tuning: {full:.1f} MB)").format(
        note=note, adapters=8 * trainable / 2**20, full=8 * total / 2**20)  # two fp32 moments per parameter


def start_line(cfg: TrainConfig, start: StartingWeights, tokenizer: Tokenizer, coverage: float) -> str:
    """What a run starts from: its weights and its tokenizer (paths), and how much of the data the tokenizer
    covers, so a stage never inherits silently."""
    if start.model_dir is not None:
        origin = _("the starting weights'")
    elif cfg.data.tokenizer:
        origin = "--tokenizer"
    elif Path(tokenizer.directory) != cfg.run_dir / "tokenizer":  # Objective.required_tokenizer's
        origin = _("the one --mode {mode} requires").format(mode=cfg.mode)
    else:
        origin = _("this run's own, trained on its data")
    return _("{mode} run {run_dir}: weights from {source}; tokenizer {tokenizer} ({origin}, {vocab} tokens, pieces "
             "for {coverage:.1%} of the training data's characters)").format(
        mode=cfg.mode, run_dir=cfg.run_dir, source=said_source(start.source), tokenizer=tokenizer.directory,
        origin=origin, vocab=tokenizer.vocab_size, coverage=coverage)


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, start: StartingWeights) -> MiniGPT:
    """The model to train: preset shape (vocab from the tokenizer) or the starting weights' shape."""
    if start.model_dir is not None:
        model, weights_tokenizer = load_consolidated(start.model_dir)
        if weights_tokenizer is not None and weights_tokenizer.checksum != tokenizer.checksum:
            raise ConfigError(_("{path}: weights were trained with another tokenizer than {tokenizer}").format(
                path=start.model_dir, tokenizer=tokenizer.directory))
        if cfg.model.dropout:
            model.set_dropout(cfg.model.dropout)
        return model
    overrides = {"vocab_size": tokenizer.vocab_size, "dropout": cfg.model.dropout}
    if cfg.data.seq_len > get_config(cfg.model.preset).max_seq_len:
        overrides["max_seq_len"] = cfg.data.seq_len
    return MiniGPT(get_config(cfg.model.preset, **overrides))


def seq_len_of(cfg: TrainConfig, model_config: MiniGPTConfig) -> int:
    seq_len = cfg.data.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise ConfigError(_("--seq-len {seq_len} exceeds the model's max_seq_len {limit}").format(
            seq_len=seq_len, limit=model_config.max_seq_len))
    return seq_len


def mixture_record(run_data: RunData, train_set: ConcatWindows, val_set: ConcatWindows, seq_len: int) -> dict:
    """What `dataset_stats.json` says of a weighted mixture: each source's path, weight, share of the tokens and
    size (an epoch of a source is its train samples; a small source repeats)."""
    total = sum(source.weight for source in run_data.mixture)
    return {source.name: {"path": str(source.dataset_dir), "weight": source.weight, "share": source.weight / total,
                          "train_samples": len(train), "val_samples": len(val), "tokens_per_epoch": len(train) * seq_len}
            for source, train, val in zip(run_data.mixture, train_set.parts, val_set.parts, strict=True)}


def write_snapshot(cfg: TrainConfig, model_config: MiniGPTConfig, start: StartingWeights, run_data: RunData,
                   engine: Engine, seq_len: int, mixture: dict | None = None) -> None:
    """The run's `training_config_snapshot.json` and `dataset_stats.json` (each dataset's statistics, and a
    mixture's sources under "mixture")."""
    snapshot = {"train": cfg.to_dict(), "model": model_config.to_dict(), "weights_from": start.source,
                "tokenizer": {"dir": str(run_data.tokenizer.directory), "checksum": run_data.tokenizer.checksum},
                "datasets": [str(d) for d in run_data.dataset_dirs], "engine": type(engine).__name__,
                "world_size": engine.world_size, "seq_len": seq_len,
                "global_batch": cfg.optim.batch_size * cfg.optim.grad_accum * engine.world_size}
    atomic_write_text(cfg.run_dir / SNAPSHOT, json.dumps(snapshot, indent=2) + "\n")
    stats = {str(d): json.loads((d / "dataset_stats.json").read_text())
             for d in run_data.dataset_dirs if (d / "dataset_stats.json").is_file()}
    if mixture:
        stats["mixture"] = mixture
    atomic_write_text(cfg.run_dir / "dataset_stats.json", json.dumps(stats, indent=2) + "\n")


def check_eval_tasks(cfg: TrainConfig) -> list:
    """The --eval-task specs, after failing when one names a file that is not there or holds no usable items
    (before training, not at the first evaluation)."""
    from minigpt.evaluation.runner import check_task_files

    specs = cfg.evaluation.task_specs
    for entry, spec in zip(cfg.evaluation.eval_task, specs, strict=True):
        for path in [spec.path] + ([Path(spec.get("dev"))] if spec.get("dev") else []):
            if not path.exists():
                raise ConfigError(_("--eval-task {entry}: {path} does not exist").format(entry=entry, path=path))
        check_task_files(spec)
    return specs


class Trainer:
    """Holds what the loop needs between steps; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig, started: float | None = None, start: StartingWeights | None = None):
        """`started`: the `time.monotonic()` reading a --max-time budget counts from (default: now; the
        command line passes the process's start). `start`: the starting weights if not `find_starting_weights`'
        (launch/debug_fullstack.py's random init when the previous stage's tokenizer lacks its prompt)."""
        self.cfg = cfg
        started = time.monotonic() if started is None else started
        # First: who this process is, and the process group the data resolution's barriers need.
        self.runtime = create_runtime(cfg.engine, cfg.optim)
        precision = run_precision(cfg, self.runtime.device, deepspeed=self.runtime.distributed)
        self.cfg = cfg = cfg.replace(precision=precision.precision)  # the engines, the snapshot
        self.eval_specs = check_eval_tasks(cfg)  # a mistyped path fails before the run directory is made
        self.run_lock: RunDirLock | None = self.runtime.main_rank_does(
            lambda: self._claim_run_dir(precision), _("claiming the run directory {path}").format(path=cfg.run_dir))
        try:
            self._set_up(started, start)
        except BaseException:
            self.release_run_dir(tidy=True)
            raise

    def _claim_run_dir(self, precision: PrecisionChoice) -> RunDirLock:
        """Main rank, before anything is written: lock the run directory (refused while another process
        holds it), refuse another run's directory unless --overwrite, then clear what --overwrite deletes
        and what interrupted writes left."""
        cfg = self.cfg
        lock = lock_run_dir(cfg.run_dir)
        try:
            earlier_run = check_fresh_run_dir(cfg)
            if lock.warning:
                print(_("[minigpt] warning: {warning}").format(warning=lock.warning), flush=True)
            if earlier_run:
                print(_("[minigpt] --overwrite: deleting {paths}").format(paths=", ".join(map(str, earlier_run))),
                      flush=True)
                remove_artefacts(earlier_run)
            for stale in sweep_temporary(cfg.run_dir):
                print(_("[minigpt] removed {path}, left by an interrupted write").format(path=stale), flush=True)
        except BaseException:
            lock.release()
            raise
        for warning in cfg.warnings():
            print(_("[minigpt] warning: {warning}").format(warning=warning), flush=True)
        line = (_("[minigpt] precision {precision} ({why}; override with --precision)") if cfg.engine.precision == "auto"
                else _("[minigpt] precision {precision} ({why})"))
        print(line.format(precision=precision.precision, why=precision.why), flush=True)
        return lock

    def release_run_dir(self, tidy: bool = False) -> None:
        """End this process's hold on the run directory (at the end of `run`; exiting does it too). `tidy`:
        set-up failed, so the directories the lock made go too where nothing else was written."""
        if self.run_lock is not None:
            self.run_lock.release(tidy)
            self.run_lock = None

    def _set_up(self, started: float, start: StartingWeights | None) -> None:
        """Everything after the run directory is claimed: data, model, engine, sampler, checkpoints."""
        cfg = self.cfg
        set_seed(cfg.seed)
        start = start or find_starting_weights(cfg)
        if start.source == NO_PREVIOUS_STAGE and self.runtime.is_main:
            print(_("[minigpt] {note}").format(note=no_previous_stage_warning(cfg)), flush=True)
        tokenizer_dir = start.model_dir  # else the mode's own requirement (a distilled student's: the teacher's)
        if tokenizer_dir is None and not cfg.data.tokenizer:
            tokenizer_dir = objective_class(cfg.mode).required_tokenizer(cfg.options, cfg.run_dir)
        self.run_data = resolve_run_data(cfg, self.runtime, tokenizer_dir, objective_class(cfg.mode).dataset_kind)
        self.tokenizer = self.run_data.tokenizer
        coverage, low_coverage = check_coverage(cfg, self.run_data, inherited=start.model_dir is not None)
        if self.runtime.is_main:
            print(_("[minigpt] {note}").format(note=start_line(cfg, start, self.tokenizer, coverage)), flush=True)
            if low_coverage:
                print(_("[minigpt] warning: {warning}").format(warning=low_coverage), flush=True)
        self.model = build_model(cfg, self.tokenizer, start)
        self.lora = self._attach_lora(start) if cfg.adapter.enabled else None
        if start.model_dir is None and objective_class(cfg.mode).previous_stages:
            start = self._keep_initial_weights(start)
        self.objective: Objective = build_objective(cfg, self.tokenizer)
        self.model = self.objective.wrap_model(self.model)  # e.g. the reward model's scalar head
        self.model_config = self.model.config
        self.seq_len = seq_len_of(cfg, self.model_config)
        self.engine = create_engine(self.model, cfg, self.runtime)
        self.train_set = open_datasets(self.run_data, self.objective, "train", self.seq_len)
        self.val_set = open_datasets(self.run_data, self.objective, "val", self.seq_len)
        if self.run_data.mixture:
            self.sampler = MixtureSampler([source.name for source in self.run_data.mixture],
                                          [len(part) for part in self.train_set.parts],
                                          [source.weight for source in self.run_data.mixture], cfg.optim.batch_size,
                                          cfg.optim.grad_accum, self.engine.rank, self.engine.world_size, seed=cfg.seed)
        else:
            self.sampler = ResumableSampler(len(self.train_set), cfg.optim.batch_size, cfg.optim.grad_accum,
                                            self.engine.rank, self.engine.world_size, seed=cfg.seed)
        self.loader = PrefetchingLoader(self.train_set, self.sampler, self.engine.device, depth=cfg.engine.prefetch)
        self.checkpoints = CheckpointManager(cfg.run_dir, self.engine, cfg.checkpointing.keep_last)
        self.step, self.tokens_seen = 0, 0
        self.source_epochs: dict[str, int] = {}
        """The epoch each mixture source's last drawn sample belongs to (a new one is said in the log)."""
        self.start = start
        self.budget: TimeBudget | None = None
        if cfg.schedule.max_time:
            state_bytes = 12 * sum(p.numel() for p in self.model.parameters())  # fp32 weights + AdamW moments
            # What evaluate() will run (--eval-batches larger than the validation set means all of it).
            eval_batches = -(-self.eval_samples() // (cfg.optim.batch_size * self.engine.world_size))
            self.budget = TimeBudget(cfg.schedule.max_time_seconds, eval_batches=eval_batches,
                                     grad_accum=cfg.optim.grad_accum, state_bytes=state_bytes, origin=started)
        self._batches: list | None = None
        self.compile_decided: bool | None = None
        """--compile auto's decision once made (or read from the checkpoint resumed): saved with each checkpoint."""
        self.data_wait = 0.0
        """Seconds the last step waited for its batches (0 when they were ready): logged as data_wait_s."""
        self.chat_samples = self.objective.chat_samples
        self.sample_prompt = cfg.evaluation.sample_prompt or default_sample_prompt(
            self.tokenizer, self.run_data.dataset_dirs, self.chat_samples)
        unseen = self.tokenizer.unseen_characters(self.sample_prompt)
        if unseen and self.runtime.is_main:
            print(_("[minigpt] hint: the tokenizer {tokenizer} never saw {unseen!r} of the sample prompt (they go as "
                    "bytes, so samples from them look garbled); train a tokenizer on text that has them (--data "
                    "YOUR_FILES --retrain-tokenizer)").format(tokenizer=self.tokenizer.directory, unseen=unseen),
                  flush=True)
        if self.engine.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            mixture = (mixture_record(self.run_data, self.train_set, self.val_set, self.seq_len)
                       if self.run_data.mixture else None)
            write_snapshot(cfg, self.model_config, start, self.run_data, self.engine, self.seq_len, mixture)

    def _attach_lora(self, start: StartingWeights) -> LoraSpec:
        """--lora-rank / --lora-init: freeze the starting weights and train adapters on them (minigpt/lora.py);
        returns the adapters' `LoraSpec`."""
        from minigpt import lora

        spec, saved = lora_spec(self.cfg, start)
        total = sum(p.numel() for p in self.model.parameters())
        try:
            trainable = lora.attach_lora(self.model, spec.rank, spec.alpha, spec.dropout, list(spec.targets))
            if saved:
                lora.load_adapter_weights(self.model, saved, self.model.config)
        except lora.LoraError as err:
            raise ConfigError(str(err)) from None
        if self.runtime.is_main:
            note = lora.describe(trainable, total, spec.rank, spec.alpha, list(spec.targets))
            print(_("[minigpt] {note}").format(note=note), flush=True)
        return spec

    def _keep_initial_weights(self, start: StartingWeights) -> StartingWeights:
        """A post-training run from random init saves its initial weights as `<run>/initial` (a fresh run
        anew, a resumed one reuses them): DPO's and RLHF's frozen reference is the starting policy, and a
        resumed run must find the same one."""
        initial = self.cfg.run_dir / INITIAL
        fresh = not self.cfg.checkpointing.resuming or not (initial / "model.pt").is_file()
        self.runtime.barrier()  # every rank has looked before the main rank writes
        if fresh and self.runtime.is_main:
            save_consolidated(initial, self.model.state_dict(), self.model.config, self.tokenizer.directory,
                              extra={"mode": self.cfg.mode, "step": 0, "weights_from": start.source})
        self.runtime.barrier()
        if not fresh:
            self.model.load_state_dict(load_consolidated(initial)[0].state_dict())
        return StartingWeights(start.source, initial)

    def resume(self) -> None:
        """Continue from --resume or --auto-resume's checkpoint (every rank), or start fresh."""
        point = self.checkpoints.resume_point(self.cfg.checkpointing.resume, self.cfg.checkpointing.auto_resume)
        if point is None:
            leftovers = previous_run_artefacts(self.cfg.run_dir) if self.cfg.checkpointing.auto_resume else []
            if self.cfg.checkpointing.auto_resume and self.engine.is_main:
                print(_("[minigpt] --auto-resume: no checkpoint in {path}, starting fresh").format(
                    path=self.cfg.run_dir), flush=True)
                if leftovers:  # an attempt that saved no checkpoint: its plots and metrics must not mix with ours
                    print(_("[minigpt] removing that attempt's {names}").format(
                        names=", ".join(p.name for p in leftovers)), flush=True)
                    remove_artefacts(leftovers)
            self.engine.barrier()
            return
        self.load_state_dict(self.checkpoints.load(point))
        if self.engine.is_main:
            print(_("[minigpt] resumed from {path} at step {step}").format(path=point.path, step=self.step),
                  flush=True)

    def state_dict(self) -> TrainerState:
        """Everything of this run a checkpoint holds besides the engine's files: counters, sampler, the --max-time
        and schedule clocks, `--compile auto`'s decision and this rank's RNG (`load_state_dict` applies it)."""
        budget = None if self.budget is None else (self.budget.elapsed(), self.engine.schedule_clock.warmup_end)
        return TrainerState(step=self.step, tokens_seen=self.tokens_seen, sampler=self.loader.state_dict(),
                            mode=self.cfg.mode, weights_from=self.start.source, precision=self.engine.precision,
                            max_steps=self.cfg.schedule.max_steps, warmup_steps=self.cfg.schedule.warmup_steps,
                            tokenizer_checksum=self.tokenizer.checksum, budget=budget, compiled=self.compile_decided,
                            rng=rng_state())

    def load_state_dict(self, state: TrainerState) -> None:
        """Apply what `state_dict` returned (read back by `CheckpointManager.load`): the same on every rank but
        for the RNG, so a refusal is raised by every rank alike."""
        if state.tokenizer_checksum not in (None, self.tokenizer.checksum):
            raise ConfigError(_("{path}: trained with tokenizer {saved}, this run uses {current} ({tokenizer})").format(
                path=state.checkpoint, saved=state.tokenizer_checksum[:12], current=self.tokenizer.checksum[:12],
                tokenizer=self.tokenizer.directory))
        try:
            self.loader.load_state_dict(state.sampler)
        except SamplerError as err:
            raise SamplerError(_("{path}: {error}").format(path=Path(state.checkpoint) / TRAINER_STATE,
                                                           error=err)) from None
        self.compile_decided = state.compiled
        self.step, self.tokens_seen = state.step, state.tokens_seen
        if self.budget is not None:
            self.budget.resume(state.budget, self.engine.schedule_clock, self.step >= self.cfg.schedule.warmup_steps)
        if state.rng is not None:
            set_rng_state(state.rng)
        schedule = self.cfg.schedule
        for name in ("max_steps", "warmup_steps"):
            before, now = getattr(state, name), getattr(schedule, name)
            if before is not None and before != now and self.engine.is_main:
                flag = "--" + name.replace("_", "-")
                print(_("[minigpt] warning: resuming with {flag} {now}, the checkpoint's run had {before}: the "
                        "learning-rate schedule (warmup, then cosine decay to step {max_steps}) is reshaped from "
                        "step {step} on; pass {flag} {before} to continue the same schedule").format(
                    flag=flag, now=now, before=before, max_steps=schedule.max_steps, step=self.step), flush=True)

    def setup_context(self) -> SetupContext:
        """What the objective may know about this run (never the Trainer itself)."""
        return SetupContext(engine=self.engine, run_dir=self.cfg.run_dir, tokenizer=self.tokenizer,
                            dataset_dirs=tuple(self.run_data.dataset_dirs), seq_len=self.seq_len,
                            batch_size=self.cfg.optim.batch_size, grad_accum=self.cfg.optim.grad_accum,
                            start_source=self.start.source, start_dir=self.start.model_dir, step=self.step,
                            mode=self.cfg.mode)

    def micro_batches(self) -> list:
        """This step's micro-batches: a new batch from the sampler, turned by the objective's `begin_batch`
        into what it trains on, or the previous step's again while the objective takes several updates
        per batch (GRPO's `--rl-updates`). A run resumed mid-cycle starts a new batch."""
        if self._batches is None or self.step % self.objective.updates_per_batch == 0:
            self._batches = self.objective.begin_batch(self.step, self.loader.next_step())
            self.data_wait = self.loader.wait_seconds
        else:
            self.data_wait = 0.0
        return self._batches

    def source_figures(self, monitor: TrainingMonitor) -> dict[str, float]:
        """A mixture's figures after the step just taken: tokens drawn from each source (`tokens/<name>`, all
        ranks) and passes over it (`epochs/<name>`); a source that began another pass is said in a log line.
        {} without a mixture."""
        if not self.run_data.mixture:
            return {}
        figures = {}
        for name, source in self.loader.state_dict()["sources"].items():
            drawn, size = source["drawn"], source["num_samples"]
            figures[f"tokens/{name}"] = drawn * self.seq_len
            figures[f"epochs/{name}"] = drawn / size
            epoch = (drawn - 1) // size  # the pass its last sample belongs to
            if epoch > self.source_epochs.get(name, 0):
                monitor.write(_("source {name} begins epoch {epoch} at step {step}: its {samples:,} training samples "
                                "({tokens:,} tokens) are seen again, in a new order").format(
                    name=name, epoch=epoch + 1, step=self.step, samples=size, tokens=size * self.seq_len))
            self.source_epochs[name] = max(epoch, 0)
        return figures

    def train_step(self, batches: list | None = None) -> tuple[float, object, int, dict]:
        """One optimizer step over `grad_accum` micro-batches: the loop owns accumulation and tells the
        engine which backward is the step's last, then steps once.

        Returns the loss and the objective's statistics averaged over micro-batches and ranks, the
        engine's StepResult, and the tokens processed by all ranks."""
        self.engine.train()
        tokens, totals = 0, {}
        batches = batches or self.micro_batches()
        for index, batch in enumerate(batches):
            loss, stats = self.objective.loss(self.engine, batch)
            self.engine.backward(loss, len(batches), last=index == len(batches) - 1)
            for name, value in {"loss": loss.detach().float().item(), **stats}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            tokens += self.objective.tokens_in(batch)
        result = self.engine.step()
        summed = reduce_by_name(totals, self.engine.all_reduce_sum, self.engine.device)
        scale = 1.0 / (len(batches) * self.engine.world_size)
        averaged = {name: value * scale for name, value in summed.items()}
        return averaged.pop("loss"), result, tokens * self.engine.world_size, averaged

    def eval_ranges(self) -> list[range]:
        """The validation indices an evaluation runs: the first `eval_batches` global batches of the validation
        set (of each source's, in a mixture), or all of it when smaller, rounded down to a multiple of the
        world size (every rank runs as many)."""
        world = self.engine.world_size
        mixture = self.run_data.mixture
        parts = zip(self.val_set.offsets[:-1], self.val_set.parts, strict=True) if mixture else [(0, self.val_set)]
        ranges = []
        for start, part in parts:
            count = min(len(part), self.cfg.evaluation.eval_batches * self.cfg.optim.batch_size * world)
            ranges.append(range(int(start), int(start) + count - count % world))
        return ranges

    def eval_samples(self) -> int:
        """Validation samples an evaluation runs (over every source of a mixture)."""
        return sum(len(indices) for indices in self.eval_ranges())

    def eval_micro_batches(self, indices: range | None = None) -> list[list[int]]:
        """This rank's share of an evaluation (or of the validation `indices` given), as the validation indices
        of each micro-batch: every rank gets as many micro-batches (ZeRO-3 gathers weights collectively at each
        forward pass)."""
        if indices is None:
            return [batch for part in self.eval_ranges() for batch in self.eval_micro_batches(part)]
        world, rank, micro = self.engine.world_size, self.engine.rank, self.cfg.optim.batch_size
        mine = list(indices[rank::world])
        return [mine[start:start + micro] for start in range(0, len(mine), micro)]

    def eval_micro_batch(self, indices: list[int], sums: MetricSums) -> None:
        """Add the validation samples at `indices` (one micro-batch) into `sums`."""
        samples = [self.val_set[i] for i in indices]
        self.objective.eval_batch(self.engine.module, collate(samples, self.engine.device), sums)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the first `eval_batches` global batches of the validation set."""
        return self.evaluate_sources()[0]

    @torch.no_grad()
    def evaluate_sources(self) -> tuple[dict[str, float], dict[str, float]]:
        """Validation metrics over the first `eval_batches` global batches of the validation set (of each
        source's together, in a mixture), and each mixture source's own loss as `val_loss/<name>` ({} without
        a mixture).

        Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively)."""
        self.engine.eval()
        per_part = []
        for indices in self.eval_ranges():
            sums = self.objective.new_eval_sums()
            for batch in self.eval_micro_batches(indices):
                self.eval_micro_batch(batch, sums)
            per_part.append(reduce_by_name(sums, self.engine.all_reduce_sum, self.engine.device))
        self.engine.train()
        if not self.eval_samples():
            return {}, {}
        if not self.run_data.mixture:
            return self.objective.metrics(per_part[0]), {}
        total = {name: sum(part[name] for part in per_part) for name in per_part[0]}
        by_source = {f"val_loss/{source.name}": self.objective.metrics(part)["val_loss"]
                     for source, part, indices in zip(self.run_data.mixture, per_part, self.eval_ranges(), strict=True)
                     if len(indices)}
        return self.objective.metrics(total), by_source

    @torch.no_grad()
    def time_ending(self) -> None:
        """Measure the final evaluation's cost for the --max-time budget, rather than extrapolate it from a
        step (the first can be many times slower than the rest): the budget's timing passes, run back to
        back (the fastest counts). Every rank runs them alike (ZeRO-3 gathers weights collectively); the
        random streams are put back, so training goes on as without them."""
        random_state = rng_state()
        while self.budget.ending_pass_due:
            self.budget.note_ending_pass(*self.ending_pass())
        self.engine.train()
        set_rng_state(random_state)

    def ending_pass(self) -> tuple[int, float, float]:
        """One timing pass: (validation micro-batches timed, their seconds, the sample's seconds). One
        micro-batch is timed, or the whole evaluation when it has at most `WHOLE_EVAL_TIMED`, and a sample
        of full length."""
        batches = self.eval_micro_batches()
        timed = batches if len(batches) <= WHOLE_EVAL_TIMED else batches[:1]
        self.engine.eval()
        started = time.perf_counter()
        sums = self.objective.new_eval_sums()  # sums are added as floats: the device has finished when timed
        for indices in timed:
            self.eval_micro_batch(indices, sums)
        evaluated = time.perf_counter()
        self.sample(stop_token_ids=())  # all its tokens: the model of the final sample may not stop early
        return len(timed), evaluated - started, time.perf_counter() - evaluated

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float]:
        """The `--eval-task` metrics as {"task/metric": value}; every rank runs them in lockstep (the
        same forward passes on each, as ZeRO-3 gathers weights collectively)."""
        if not self.eval_specs:
            return {}
        from minigpt.evaluation.context import EvalContext
        from minigpt.evaluation.runner import flat_metrics, run_tasks

        self.engine.eval()
        ctx = EvalContext(self.engine.module, self.tokenizer, self.runtime, batch_size=self.cfg.optim.batch_size,
                          lockstep=self.runtime.distributed, progress=False)
        results = run_tasks(self.eval_specs, ctx)
        self.engine.train()
        return flat_metrics(results)

    def log_evaluation(self, monitor: TrainingMonitor, index: int) -> None:
        """Validation metrics under val/, then the --eval-task metrics under eval/."""
        metrics, by_source = self.evaluate_sources()
        monitor.log_eval(index, metrics, named=by_source)
        if self.eval_specs:
            monitor.log_eval(index, self.evaluate_tasks(), split="eval")

    @torch.no_grad()
    def sample(self, stop_token_ids: tuple[int, ...] | None = None) -> str:
        """Greedy continuation of the sample prompt, or in chat modes its answer as a user turn of the chat
        template; every rank runs it (ZeRO-3 gathers weights collectively). `stop_token_ids=()` never stops
        early: the longest a sample can take."""
        self.engine.eval()
        generator = TextGenerator(self.engine.module, self.tokenizer, self.engine.device)
        config = GenerationConfig(max_new_tokens=48, do_sample=False, stop_token_ids=stop_token_ids)
        text = generator.generate([self.sample_prompt], config, chat=self.chat_samples)[0]
        self.engine.train()
        return f"[user] {self.sample_prompt}\n[assistant] {text}" if self.chat_samples else self.sample_prompt + text

    def record_sample(self, monitor: TrainingMonitor, index: int) -> None:
        """Generate the fixed-prompt sample (all ranks) and log it; the main rank appends it to samples.jsonl."""
        text = self.sample()
        monitor.log_text(index, "sample", text)
        if self.engine.is_main:
            with open(self.cfg.run_dir / "samples.jsonl", "a") as handle:
                handle.write(json.dumps({"step": index, "prompt": self.sample_prompt, "chat": self.chat_samples,
                                         "text": text},
                                        ensure_ascii=False) + "\n")

    def save(self) -> Path:
        started = time.perf_counter()
        path = self.checkpoints.save(self.step, self.state_dict())
        if self.budget is not None:
            self.budget.note_save(time.perf_counter() - started)
        return path

    def agree(self, stop: StopRequest) -> tuple[bool, bool]:
        """(stop requested on any rank, another step fits the time budget), the same on every rank.

        With a budget, one all-reduce carries the stop flag, the time spent and the time the ending needs
        (averaged over ranks), and the schedule clock is set from them; without one, only the flag."""
        if self.budget is None:
            return self.engine.any_rank(stop.requested), True
        numbers = torch.tensor([float(stop.requested), self.budget.elapsed(), self.budget.reserve()],
                               dtype=torch.float64, device=self.engine.device)
        flag, elapsed, reserve = self.engine.all_reduce_sum(numbers).tolist()
        world = self.engine.world_size
        elapsed, reserve = elapsed / world, reserve / world
        self.engine.schedule_clock.fraction = self.budget.fraction(elapsed, reserve)
        return flag > 0, self.budget.fits(elapsed, reserve)

    def consolidate(self) -> Path:
        """Write `final/`: the consolidated weights (a LoRA run's merged into the frozen ones, and its adapter
        alone in `final/adapter/`)."""
        state_dict = self.engine.consolidated_state_dict()
        out = self.cfg.run_dir / FINAL
        if self.engine.is_main:
            weights = state_dict
            if self.lora is not None:
                from minigpt.lora import merged_state_dict

                weights = merged_state_dict(state_dict, self.lora.alpha, self.lora.rank)
            self.objective.save_consolidated(out, weights, self.model_config, self.tokenizer.directory,
                 extra={"mode": self.cfg.mode, "step": self.step, "tokens_seen": self.tokens_seen})
            if self.lora is not None:
                from minigpt.lora import ADAPTER_DIR, save_peft_adapter, weights_checksum

                save_peft_adapter(out / ADAPTER_DIR, state_dict, self.model_config, rank=self.lora.rank,
                                  alpha=self.lora.alpha, dropout=self.lora.dropout, base=self.start.source,
                                  base_checksum=weights_checksum(self.start.model_dir))
        self.engine.barrier()
        return out

    def decide_compile(self, monitor: TrainingMonitor) -> None:
        """`--compile auto`'s decision, from facts fixed before the first step (minigpt.train.autocompile), or
        the one the resumed run recorded; printed in one line and saved with each checkpoint."""
        if self.cfg.engine.compile != "auto":
            return
        why_not = compile_unavailable(self.engine.device, plain_engine=isinstance(self.engine, PlainEngine),
                                      moe=bool(self.model_config.num_experts),
                                      activation_checkpointing=self.cfg.engine.activation_checkpointing,
                                      mode=self.cfg.mode)
        if why_not:
            monitor.write(_("--compile auto: eager ({why})").format(why=why_not))
            return
        if self.compile_decided is not None:
            monitor.write(_("--compile auto: compiled, as the run decided before its checkpoint")
                          if self.compile_decided else
                          _("--compile auto: eager, as the run decided before its checkpoint"))
        else:
            budget_left = None if self.budget is None else self.budget.seconds - self.budget.elapsed()
            self.compile_decided, why = compile_pays(self.engine.device, self.engine.precision,
                                                     self.cfg.schedule.max_steps - self.step, budget_left)
            decision = (_("--compile auto: compiled ({why})") if self.compile_decided
                        else _("--compile auto: eager ({why})"))
            monitor.write(decision.format(why=why))
        self.engine.set_compiled(self.compile_decided)

    def run(self, stop: StopRequest | None = None) -> int:
        """Train to max_steps; stop early (exit 75) after saving when `stop` is requested on any rank."""
        cfg = self.cfg
        self.resume()
        if self.run_data.mixture:  # a resumed run says only the epochs that begin from here on
            self.source_epochs = {name: max(source["drawn"] - 1, 0) // source["num_samples"]
                                  for name, source in self.loader.state_dict()["sources"].items()}
        # Setup may draw random numbers (building a reference model initialises weights first); it must not
        # move the training's random stream, or a resumed run would sample differently from an uninterrupted one.
        random_state = rng_state()
        self.objective.setup(self.setup_context())
        set_rng_state(random_state)
        monitor = TrainingMonitor(cfg.run_dir, enabled=self.engine.is_main, total_steps=cfg.schedule.max_steps,
                                  start_step=self.step,
                                  flops_per_token=self.model_config.flops_per_token(self.seq_len),
                                  device=self.engine.device, world_size=self.engine.world_size,
                                  precision=self.engine.precision, print_interval=cfg.evaluation.log_interval,
                                  # a bar only on a terminal: in a log file every printed line re-draws it
                                  progress=sys.stdout.isatty())
        stop = stop or StopRequest().install()
        self.decide_compile(monitor)
        last_saved = self.step if self.step else -1
        try:
            in_time = self.budget is None or self.step >= cfg.schedule.max_steps or self.agree(stop)[1]
            while self.step < cfg.schedule.max_steps and in_time:
                index, started = self.step, time.perf_counter()  # the monitor numbers steps from 0
                loss, result, tokens, stats = self.train_step()
                self.step += 1
                self.tokens_seen += tokens
                seconds = time.perf_counter() - started
                monitor.log_step(index, loss=loss, lr=result.lr, grad_norm=result.grad_norm, tokens=tokens,
                                 seconds=seconds, extra={**stats, "data_wait_s": self.data_wait},
                                 named=self.source_figures(monitor))
                if self.budget is not None:
                    self.budget.note_step(seconds)
                every = cfg.evaluation.eval_interval
                if every and self.step % every == 0 and self.step < cfg.schedule.max_steps:
                    started = time.perf_counter()
                    self.log_evaluation(monitor, index)
                    self.record_sample(monitor, index)
                    if self.budget is not None:
                        self.budget.note_eval(time.perf_counter() - started)
                if self.budget is not None and self.budget.ending_pass_due and self.step < cfg.schedule.max_steps:
                    self.time_ending()
                stop_now, in_time = self.agree(stop)
                # Periodic saves stop short of the end (the finished run saves after its final evaluation),
                # but a stop request saves whatever step it lands on, the last one included.
                every = cfg.checkpointing.save_interval
                due = every and self.step % every == 0 and self.step < cfg.schedule.max_steps
                # A non-finite loss is never checkpointed (the engine skipped its update, but be safe).
                if monitor.checkpoint_safe and (due or stop_now):
                    with stop.saving():  # a second Ctrl-C waits for the checkpoint to be complete
                        self.save()
                    last_saved = self.step
                if stop_now:
                    why = stop.signal_name or stop.reason_now() or _("signal on another rank")
                    stopped = (_("stopped at step {step} ({why}); checkpoint saved") if last_saved == self.step
                               else _("stopped at step {step} ({why}); checkpoint NOT saved (non-finite loss)"))
                    monitor.write(stopped.format(step=self.step, why=why))
                    return EXIT_PREEMPTED
            if not in_time:
                monitor.write(_("--max-time {max_time}: stopping at step {step} of {max_steps} after {elapsed:.0f} s, "
                                "leaving time to evaluate, save and consolidate").format(
                    max_time=cfg.schedule.max_time, step=self.step, max_steps=cfg.schedule.max_steps,
                    elapsed=self.budget.elapsed()))
                if self.step < 2 * cfg.schedule.warmup_steps:
                    monitor.write(_("warning: the warmup (--warmup-steps {warmup}) took most of the {steps} steps this "
                                    "budget allowed, so the learning rate barely left it: for a budget this short pass "
                                    "--warmup-steps {suggested} or so").format(
                        warmup=cfg.schedule.warmup_steps, steps=self.step, suggested=max(1, self.step // 10)))
            self.log_evaluation(monitor, self.step - 1)
            if last_saved != self.step:
                with stop.saving():
                    self.save()
            final = self.consolidate()
            self.record_sample(monitor, self.step - 1)
            spent = _(" in {elapsed:.1f} s of {budget:.0f} s").format(
                elapsed=self.budget.elapsed(), budget=cfg.schedule.max_time_seconds) if self.budget else ""
            monitor.write(_("done: {steps} steps, {tokens:,} tokens{spent}; consolidated weights in {final}").format(
                steps=self.step, tokens=self.tokens_seen, spent=spent, final=final))
            return EXIT_FINISHED
        finally:
            self.loader.close()
            stop.uninstall()
            monitor.close()
            self.release_run_dir()


def run_precision(cfg: TrainConfig, device: torch.device, *, deepspeed: bool) -> PrecisionChoice:
    """The run's precision: --precision as given, or auto's choice for this hardware — except that a resumed
    auto run keeps the precision its checkpoint recorded (a run moved to another machine continues on the
    same kind of step)."""
    if cfg.engine.precision == "auto" and cfg.checkpointing.resuming:
        recorded = recorded_precision(cfg.checkpointing.resume or cfg.run_dir)
        if recorded:
            return PrecisionChoice(recorded, _("auto: as the run resumed decided when it started"))
    return choose_precision(cfg.engine.precision, device, deepspeed=deepspeed)


def train(cfg: TrainConfig, stop: StopRequest | None = None, started: float | None = None) -> int:
    """Run training as configured; returns the process exit code (see minigpt.signals). `started`: the
    `time.monotonic()` reading a --max-time budget counts from (default: now)."""
    return Trainer(cfg, started=started).run(stop)


def planned_model(cfg: TrainConfig, start: StartingWeights, inputs: list[Path | str]) -> tuple[MiniGPTConfig, str]:
    """The shape of the model the run will build, and where its vocabulary comes from, without building it."""
    if start.model_dir is not None:
        model_config, _meta = read_consolidated_meta(start.model_dir)
        return model_config, _("weights {path}").format(path=start.model_dir)
    # As the run resolves its tokenizer: a mode's own requirement (a distilled student's: the teacher's)
    required = None if cfg.data.tokenizer else objective_class(cfg.mode).required_tokenizer(cfg.options, cfg.run_dir)
    shard_dirs = [p for p in inputs if isinstance(p, Path) and (p / "train" / "meta.json").is_file()]
    if required is not None:
        vocab, vocab_source = Tokenizer(required).vocab_size, _("tokenizer {path}").format(path=required)
    elif shard_dirs and not cfg.data.tokenizer:  # shards fix the vocabulary they were built with
        vocab = json.loads((shard_dirs[0] / "train" / "meta.json").read_text())["vocab_size"]
        vocab_source = _("shards {path}").format(path=shard_dirs[0])
    else:
        vocab, vocab_source = planned_vocab_size(cfg)
    return get_config(cfg.model.preset, vocab_size=vocab), vocab_source


def dry_run(cfg: TrainConfig) -> int:
    """Validate config, data and DeepSpeed config without building anything; print the plan."""
    from minigpt.engine import detect_device, launched_distributed, validate_engine_config

    check_eval_tasks(cfg)
    start = find_starting_weights(cfg)
    earlier_run = check_fresh_run_dir(cfg)
    inputs = planned_inputs(cfg)
    mixture = parse_mixture(cfg.data.sources)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    device = detect_device(cfg.engine.device)
    precision = run_precision(cfg, device, deepspeed=launched_distributed() or bool(cfg.engine.ds_config))
    # The plan shows the precision the run will use: a resumed auto run's comes from its checkpoint.
    engine_plan = validate_engine_config(cfg.replace(precision=precision.precision), world_size, device)
    model_config, vocab_source = planned_model(cfg, start, inputs)
    seq_len = seq_len_of(cfg, model_config) if cfg.data.seq_len <= model_config.max_seq_len else cfg.data.seq_len
    student_tokenizer = start.model_dir or cfg.data.tokenizer or None  # else the mode's required one, or its own
    mode_lines = objective_class(cfg.mode).plan(cfg.options, cfg.run_dir, student_tokenizer,
                                                cfg.optim.batch_size * seq_len)
    adapters = [lora_plan(cfg, start, model_config)] if cfg.adapter.enabled else []
    tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * world_size * seq_len
    overwrite = _(" (--overwrite deletes {names})").format(
        names=", ".join(p.name for p in earlier_run)) if earlier_run else ""
    warnings = [*cfg.warnings(), *([no_previous_stage_warning(cfg)] if start.source == NO_PREVIOUS_STAGE else [])]
    print("\n".join([
        _("mode            {mode} (weights: {source})").format(mode=cfg.mode, source=said_source(start.source)),
        _("model           {config}: {params:,} parameters, vocab {vocab} ({vocab_source})").format(
            config=cfg.model.preset, params=model_config.num_params(), vocab=model_config.vocab_size,
            vocab_source=vocab_source),
        *adapters,
        *mode_lines,
        _("data            {inputs}").format(inputs=", ".join(map(str, inputs))),
        *([_("mixture         {shares} of the tokens").format(shares=", ".join(
            f"{source.name} {source.weight / sum(s.weight for s in mixture):.1%}" for source in mixture))]
          if mixture else []),
        _("engine          {plan}").format(plan=engine_plan),
        _("precision       {precision} ({why})").format(precision=precision.precision, why=precision.why),
        _("batch           {batch} x {accum} accumulation x {world_size} rank(s) x {seq_len} tokens = {tokens:,} "
          "tokens/step").format(batch=cfg.optim.batch_size, accum=cfg.optim.grad_accum, world_size=world_size, seq_len=seq_len,
                                tokens=tokens_per_step),
        _("steps           {steps:,} ({tokens:,} tokens), warmup {warmup}").format(
            steps=cfg.schedule.max_steps, tokens=cfg.schedule.max_steps * tokens_per_step, warmup=cfg.schedule.warmup_steps),
        _("output          {path}{overwrite}").format(path=cfg.run_dir, overwrite=overwrite),
        *(_("warning         {warning}").format(warning=warning) for warning in warnings),
        _("dry run: configuration is valid; nothing was trained"),
    ]))
    return EXIT_FINISHED
