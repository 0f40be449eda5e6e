"""The training input pipeline: the next steps' micro-batches are assembled while the current step computes.

A background thread draws index batches from the `ResumableSampler` in its exact order, reads the windows
(memory-mapped pages, numpy stacking) and hands over ready tensors (pinned on CUDA, so the copy to the GPU
is asynchronous). The sampler state checkpointed is the one after the last step *handed out*, never the
prefetcher's position, so a resumed run sees exactly the batches an uninterrupted one would have seen.

Only data assembly moves to the thread: datasets hold no random state, and what a step does with its
batches (an objective's `begin_batch`, rollouts) stays in the training loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from minigpt.data.sampler import ResumableSampler
from minigpt.i18n import _


def stack(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """One micro-batch of CPU tensors from a list of dataset samples (dicts of equal-length int arrays)."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def collate(samples: Sequence[dict[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in stack(samples).items()}


class _Failed:
    """An exception raised in the worker, re-raised in the training loop at the step that needed it."""

    def __init__(self, error: BaseException):
        self.error = error


class PrefetchingLoader:
    """Step after step, this rank's `grad_accum` micro-batches on `device`, `depth` steps assembled ahead.

    depth = 0 assembles each step's batches in the caller's thread when asked (no thread).
    `wait_seconds` is how long the last `next_step()` blocked the caller: the data-wait share of a step.
    """

    def __init__(self, dataset, sampler: ResumableSampler, device: torch.device, depth: int = 2):
        if depth < 0:
            raise ValueError(_("prefetch depth must be >= 0, got {depth}").format(depth=depth))
        self.dataset, self.sampler, self.device, self.depth = dataset, sampler, device, depth
        self.pin = device.type == "cuda"
        self.wait_seconds = 0.0
        self._handed_state = sampler.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def state_dict(self) -> dict:
        """The sampler state after the last step handed out (what a checkpoint must record)."""
        return dict(self._handed_state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: steps prefetched from the old position are dropped."""
        self.close()
        self.sampler.load_state_dict(state)
        self._handed_state = self.sampler.state_dict()

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        started = time.perf_counter()
        if self.depth == 0:
            batches, state = self._assemble()
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, _Failed):
                self.close()
                raise item.error
            batches, state = item
        batches = [{k: v.to(self.device, non_blocking=self.pin) for k, v in b.items()} for b in batches]
        self._handed_state = state
        self.wait_seconds = time.perf_counter() - started
        return batches

    def close(self) -> None:
        """Stop the worker and drop what it assembled ahead (the sampler is left past those steps)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting to put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread, self._queue = None, None
        self.sampler.load_state_dict(self._handed_state)

    def _assemble(self) -> tuple[list[dict[str, torch.Tensor]], dict]:
        batches = []
        for indices in self.sampler.next_step():
            batch = stack([self.dataset[int(i)] for i in indices])
            batches.append({k: v.pin_memory() for k, v in batch.items()} if self.pin else batch)
        return batches, self.sampler.state_dict()

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, name="minigpt-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._assemble()
            except BaseException as error:  # noqa: BLE001 - handed to the training loop, which raises it
                item = _Failed(error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
