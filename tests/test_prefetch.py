"""The prefetching loader: the sampler's exact order, the checkpointed state of the steps handed out (not of
those assembled ahead), errors raised where the step needs the batch, and batches ready while a step computes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from minigpt.data.prefetch import PrefetchingLoader, collate
from minigpt.data.sampler import ResumableSampler

CPU = torch.device("cpu")


class Windows:
    """A map-style dataset whose sample i holds i, optionally slow or failing at one index."""

    def __init__(self, size: int = 100, delay: float = 0.0, fail_at: int | None = None):
        self.size, self.delay, self.fail_at = size, delay, fail_at

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index == self.fail_at:
            raise ValueError(f"corrupt window {index}")
        time.sleep(self.delay)
        return {"input_ids": np.full(4, index, dtype=np.int64), "labels": np.full(4, -index, dtype=np.int64)}


def sampler(**kwargs) -> ResumableSampler:
    return ResumableSampler(100, micro_batch_size=3, grad_accum=2, seed=7, **kwargs)


def direct_steps(count: int, **kwargs) -> list[list[dict[str, torch.Tensor]]]:
    """What the loop did before prefetching: draw indices, read, stack, step by step."""
    data, plain = Windows(), sampler(**kwargs)
    return [[collate([data[int(i)] for i in indices], CPU) for indices in plain.next_step()] for _ in range(count)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for batch_a, batch_b in zip(step_a, step_b, strict=True):
            assert batch_a.keys() == batch_b.keys()
            for key in batch_a:
                assert torch.equal(batch_a[key], batch_b[key]), key


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_follow_the_sampler_order_across_epochs(depth):
    loader = PrefetchingLoader(Windows(), sampler(), CPU, depth=depth)
    try:
        got = [loader.next_step() for _ in range(40)]  # 16 steps an epoch: crosses two epoch boundaries
    finally:
        loader.close()
    assert_same(got, direct_steps(40))


def test_rank_slices_are_kept():
    loader = PrefetchingLoader(Windows(), sampler(rank=1, world_size=2), CPU, depth=2)
    try:
        got = [loader.next_step() for _ in range(10)]
    finally:
        loader.close()
    assert_same(got, direct_steps(10, rank=1, world_size=2))


def test_checkpointed_state_is_that_of_the_steps_handed_out_and_resumes_exactly():
    loader = PrefetchingLoader(Windows(), sampler(), CPU, depth=3)
    for _ in range(5):
        loader.next_step()
    time.sleep(0.2)  # the worker is three steps ahead by now
    state = loader.state_dict()
    reference = sampler()
    for _ in range(5):
        reference.next_step()
    assert state == reference.state_dict()
    rest = [loader.next_step() for _ in range(20)]
    loader.close()

    resumed = PrefetchingLoader(Windows(), sampler(), CPU, depth=3)
    resumed.load_state_dict(state)
    try:
        assert_same([resumed.next_step() for _ in range(20)], rest)
    finally:
        resumed.close()


def test_close_leaves_the_sampler_after_the_steps_handed_out():
    shared = sampler()
    loader = PrefetchingLoader(Windows(), shared, CPU, depth=3)
    first = [loader.next_step() for _ in range(4)]
    time.sleep(0.1)
    loader.close()
    assert shared.state.position == 4 * shared.global_batch
    again = PrefetchingLoader(Windows(), shared, CPU, depth=0)
    assert_same(first + [again.next_step() for _ in range(3)], direct_steps(7))


def test_a_failing_read_raises_at_the_step_that_needs_it_with_its_message():
    order = sampler()
    indices = [int(i) for _ in range(3) for micro in order.next_step() for i in micro]
    loader = PrefetchingLoader(Windows(fail_at=indices[-1]), sampler(), CPU, depth=2)
    loader.next_step()
    loader.next_step()
    with pytest.raises(ValueError, match=f"corrupt window {indices[-1]}"):
        loader.next_step()
    assert loader.state_dict()["position"] == 2 * order.global_batch


def test_the_next_steps_batches_are_ready_while_a_step_computes():
    """Assembling a step's batches takes ~60 ms (6 slow reads); the step computes for 120 ms. Read in the loop
    the step waits the full 60 ms each time; prefetched, it finds them ready."""
    def waits(depth: int) -> list[float]:
        loader = PrefetchingLoader(Windows(delay=0.01), sampler(), CPU, depth=depth)
        result = []
        try:
            for _ in range(6):
                loader.next_step()
                result.append(loader.wait_seconds)
                time.sleep(0.12)  # the step's compute (sleep releases the GIL, as torch's kernels do)
        finally:
            loader.close()
        return result

    synchronous, prefetched = waits(0), waits(2)
    assert min(synchronous) >= 0.055, synchronous
    assert max(prefetched[1:]) < 0.03, prefetched


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="prefetch depth"):
        PrefetchingLoader(Windows(), sampler(), CPU, depth=-1)
