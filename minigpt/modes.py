"""The training modes: `--mode` name -> its objective class, the one table every list of modes comes from.

A built-in mode is named by the import path of its class, so listing the modes (`--mode`'s choices) imports
neither torch nor the objectives; the class is imported when it is first asked for (a `TrainConfig` of that mode,
whose options are the class's `options` dataclass; `--help`, which lists every mode's flags).
Everything else about a mode is an attribute of its `Objective` subclass (`minigpt/train/objective.py`):
the stages whose weights it starts from, the shard kind it trains on, whether its samples are chat,
whether its batch shapes vary. A new mode is one file with that subclass and one line in `OBJECTIVES`
(or, from outside the package, one `register_objective` call).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from minigpt.i18n import _

OBJECTIVES: dict[str, str | type] = {
    "pretrain": "minigpt.train.language_modeling:Pretraining",
    "sft": "minigpt.train.language_modeling:SupervisedFineTuning",
    "dpo": "minigpt.train.dpo:DPO",
    "reward": "minigpt.train.reward:RewardModeling",
    "rlhf": "minigpt.train.rlhf:RLHF",
    "distill": "minigpt.train.distill:Distillation",
    "distill-sft": "minigpt.train.distill:SFTDistillation",
}
"""Mode name -> its `Objective` subclass, or `"module:Class"` where it is imported from when first asked for."""


def mode_names() -> tuple[str, ...]:
    """The modes `--mode` accepts, built-in ones first, in registration order."""
    return tuple(OBJECTIVES)


def objective_class(mode: str) -> type:
    """The `Objective` subclass of `mode` (imported on first use)."""
    if mode not in OBJECTIVES:
        raise NotImplementedError(f"--mode {mode} is not implemented")
    target = OBJECTIVES[mode]
    if isinstance(target, str):
        module, _colon, name = target.partition(":")
        target = OBJECTIVES[mode] = getattr(importlib.import_module(module), name)
    return target


def build_objective(cfg, tokenizer) -> Any:
    """The objective of `cfg.mode`, built from the mode's own options (`cfg.options`)."""
    return objective_class(cfg.mode).from_options(cfg.options, tokenizer)


def register_objective(mode: str, objective: type | str) -> None:
    """Add `mode`, trained by `objective` (an `Objective` subclass or its `"module:Class"` path).

    A name already taken is refused, and so is a class whose `dataset_kind` no shard can have."""
    if mode in OBJECTIVES:
        raise ValueError(_("--mode {mode} is already registered ({objective})").format(
            mode=mode, objective=OBJECTIVES[mode]))
    if not isinstance(objective, str):
        from minigpt.data.shards import KINDS

        if objective.dataset_kind not in KINDS:
            raise ValueError(_("{name}.dataset_kind {kind!r} is not one of {kinds}").format(
                name=objective.__name__, kind=objective.dataset_kind, kinds=KINDS))
    OBJECTIVES[mode] = objective


def unregister_objective(mode: str) -> None:
    """Remove a mode `register_objective` added."""
    del OBJECTIVES[mode]


@contextlib.contextmanager
def registered_objective(mode: str, objective: type | str) -> Iterator[None]:
    """`mode` registered for the duration of a `with` block (a test's own mode never outlives the test)."""
    register_objective(mode, objective)
    try:
        yield
    finally:
        unregister_objective(mode)
