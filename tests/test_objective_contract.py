"""The loop–objective contract and metrics by name, checked without training anything."""

from __future__ import annotations

import pytest
import torch

from minigpt.metrics import MetricSums, reduce_by_name
from minigpt.modes import mode_names, objective_class
from minigpt.train.objective import Objective


def test_every_mode_is_an_objective_with_declared_evaluation_sums():
    assert mode_names() == ("pretrain", "sft", "dpo", "reward", "rlhf", "distill", "distill-sft")
    for mode in mode_names():
        cls = objective_class(mode)
        assert issubclass(cls, Objective), mode
        assert cls.eval_sums and len(set(cls.eval_sums)) == len(cls.eval_sums), mode


def test_modes_keep_the_facts_the_loop_had_in_tables():
    """Shard kinds, previous stages, chat samples and varying shapes, as the loop, config and autocompile
    kept them before each objective class declared its own."""
    facts = {mode: (cls.dataset_kind, cls.previous_stages, cls.chat_samples, cls.varying_shapes)
             for mode, cls in ((mode, objective_class(mode)) for mode in mode_names())}
    assert facts == {"pretrain": ("pretrain", (), False, False),
                     "sft": ("sft", ("pretrain",), True, False),
                     "dpo": ("dpo", ("sft",), True, True),
                     "reward": ("dpo", ("sft", "pretrain"), False, True),
                     "rlhf": ("rlhf", ("dpo", "sft"), True, True),
                     "distill": ("pretrain", (), False, False),
                     "distill-sft": ("sft", ("distill", "pretrain"), True, False)}


def test_an_undeclared_metric_sum_is_refused_by_name():
    sums = MetricSums(("loss_sum", "tokens"))
    sums.add("tokens", torch.tensor(3.0))
    with pytest.raises(KeyError, match="accuracy"):
        sums.add("accuracy", 1.0)


def test_reduction_by_name_does_not_depend_on_insertion_order():
    """Two ranks that filled their sums in different orders still add name to name."""
    def two_ranks(values: torch.Tensor) -> torch.Tensor:  # stands in for an all-reduce over 2 equal ranks
        return values * 2

    first = reduce_by_name({"margin": 1.0, "accuracy": 0.5, "pairs": 4.0}, two_ranks)
    second = reduce_by_name({"pairs": 4.0, "accuracy": 0.5, "margin": 1.0}, two_ranks)
    assert first == second == {"accuracy": 1.0, "margin": 2.0, "pairs": 8.0}
    assert reduce_by_name({}, two_ranks) == {}


def test_default_hooks_leave_the_loop_behaviour_unchanged():
    objective = Objective()
    model = torch.nn.Linear(2, 2)
    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}]
    assert objective.wrap_model(model) is model
    assert objective.begin_batch(0, batches) is batches
    assert objective.tokens_in(batches[0]) == 10
    assert objective.updates_per_batch == 1
