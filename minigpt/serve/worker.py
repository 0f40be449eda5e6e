"""One thread owns the model: requests wait in a bounded queue and are decoded by that thread only.

Every decode allocates its own KV cache, and only the worker thread ever calls the model, so concurrent
requests cannot touch each other's cache. Requests waiting together with the same sampling settings
and no seed are decoded as one batch (left-padded; each row computes what it would alone). A seeded
request runs alone, so its answer depends on its seed only, not on what else was waiting. A job whose
client has gone is dropped from the queue, and its batch stops decoding once no job in it is listened to.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from minigpt.generate import GenerationConfig, TextDelta, TextGenerator

MAX_BATCH_ROWS = 32
"""Most sequences decoded together (choices of all batched requests)."""
MAX_QUEUE = 64
"""Most requests waiting for the worker (the one it is decoding aside)."""


_NOTHING = object()
"""No event arrived in a poll interval."""


class QueueFull(Exception):
    """The worker already has `max_queue` requests waiting; the server answers 429 (the message is the API's)."""

    def __init__(self, waiting: int):
        super().__init__(waiting)
        self.waiting = waiting


class ClientGone(Exception):
    """The client of a job closed its connection while the job waited or decoded."""


@dataclass
class Job:
    """One request's prompts and the events the worker sends back: lists of `TextDelta` (indices are the
    request's own choice indices), then None at the end, or an exception if decoding failed."""

    prompt_ids: list[list[int]]
    config: GenerationConfig
    chat: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def results(self, client_gone: Callable[[], bool] | None = None,
                poll_seconds: float = 0.05) -> Iterator[list[TextDelta]]:
        """The job's deltas as the worker produces them; raises what decoding raised. While waiting, asks
        `client_gone` every `poll_seconds`: when it says yes, the job is cancelled and `ClientGone` raised."""
        next_check = time.monotonic() + poll_seconds
        while True:
            try:
                event = self.events.get(timeout=poll_seconds if client_gone else None)
            except queue.Empty:
                event = _NOTHING
            if client_gone is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + poll_seconds
                if client_gone():
                    self.cancel()
                    raise ClientGone
            if event is _NOTHING:
                continue
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        """The client went away: stop sending (and, once no one in its batch listens, decoding)."""
        self.cancelled.set()


class GenerationWorker:
    """The model's only user: a daemon thread taking jobs from a bounded list of waiting jobs."""

    def __init__(self, generator: TextGenerator, max_batch_rows: int = MAX_BATCH_ROWS,
                 max_queue: int = MAX_QUEUE):
        self.generator = generator
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._stopping = False
        self.batches_run = 0
        self.steps_run = 0
        """Decoding steps run so far, over all batches (for tests and monitoring)."""
        self.thread = threading.Thread(target=self._run, name="minigpt-generation", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (not counting those being decoded)."""
        with self._changed:
            return len(self._waiting)

    def submit(self, prompt_ids: list[list[int]], config: GenerationConfig, chat: bool) -> Job:
        """Queue a job; `QueueFull` when `max_queue` jobs already wait."""
        job = Job(prompt_ids, config, chat)
        with self._changed:
            self._waiting = [j for j in self._waiting if not j.cancelled.is_set()]
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self._changed.notify()
        return job

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self.thread.join()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._decode(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and the waiting jobs that can share its batch; None once stopped and empty."""
        with self._changed:
            while True:
                self._waiting = [j for j in self._waiting if not j.cancelled.is_set()]
                if self._waiting:
                    break
                if self._stopping:
                    return None
                self._changed.wait()
            first = self._waiting.pop(0)
            batch = [first] + self._batchable(first)
            self._waiting = [j for j in self._waiting if all(j is not b for b in batch)]
            return batch

    def _batchable(self, first: Job) -> list[Job]:
        """Waiting jobs that can share `first`'s batch, oldest first."""
        if first.config.seed is not None and not first.config.greedy:
            return []
        taken: list[Job] = []
        rows = len(first.prompt_ids)
        for job in self._waiting:
            fits = rows + len(job.prompt_ids) <= self.max_batch_rows
            if fits and job.config == first.config and job.chat == first.chat:
                taken.append(job)
                rows += len(job.prompt_ids)
        return taken

    def _decode(self, batch: list[Job]) -> None:
        owners = [(job, index) for job in batch for index in range(len(job.prompt_ids))]
        prompts = [ids for job in batch for ids in job.prompt_ids]
        self.batches_run += 1
        try:
            for step in self.generator.stream_batch(prompts, batch[0].config, chat=batch[0].chat):
                self.steps_run += 1
                per_job: dict[int, list[TextDelta]] = {}
                for delta in step:
                    job, index = owners[delta.index]
                    per_job.setdefault(id(job), []).append(
                        TextDelta(index, delta.text, delta.finish_reason, delta.completion_tokens))
                for job in batch:
                    if id(job) in per_job and not job.cancelled.is_set():
                        job.events.put(per_job[id(job)])
                if all(job.cancelled.is_set() for job in batch):
                    break
        except Exception as err:  # reported to every request of the batch; the worker keeps serving
            for job in batch:
                job.events.put(err)
            return
        for job in batch:
            job.events.put(None)


__all__ = ["ClientGone", "GenerationWorker", "Job", "QueueFull"]
