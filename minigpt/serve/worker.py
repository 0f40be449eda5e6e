"""One thread owns the model: requests wait in a queue and are decoded by that thread only.

Every decode allocates its own KV cache, and only the worker thread ever calls the model, so concurrent
requests cannot touch each other's cache. Requests waiting together with the same sampling settings
and no seed are decoded as one batch (left-padded; each row computes what it would alone). A seeded
request runs alone, so its answer depends on its seed only, not on what else was waiting.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from minigpt.generate import GenerationConfig, TextDelta, TextGenerator

MAX_BATCH_ROWS = 32
"""Most sequences decoded together (choices of all batched requests)."""


@dataclass
class Job:
    """One request's prompts and the events the worker sends back: lists of `TextDelta` (indices are the
    request's own choice indices), then None at the end, or an exception if decoding failed."""

    prompt_ids: list[list[int]]
    config: GenerationConfig
    chat: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def results(self) -> Iterator[list[TextDelta]]:
        """The job's deltas as the worker produces them; raises what decoding raised."""
        while True:
            event = self.events.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        """The client went away: stop sending (and, once no one in its batch listens, decoding)."""
        self.cancelled.set()


class GenerationWorker:
    """The model's only user: a daemon thread taking jobs from a queue."""

    def __init__(self, generator: TextGenerator, max_batch_rows: int = MAX_BATCH_ROWS):
        self.generator = generator
        self.max_batch_rows = max_batch_rows
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches_run = 0
        self.steps_run = 0
        """Decoding steps run so far, over all batches (for tests and monitoring)."""
        self.thread = threading.Thread(target=self._run, name="minigpt-generation", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids: list[list[int]], config: GenerationConfig, chat: bool) -> Job:
        job = Job(prompt_ids, config, chat)
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [j for j in [job] + self._batchable(job) if not j.cancelled.is_set()]
            if batch:
                self._decode(batch)

    def _batchable(self, first: Job) -> list[Job]:
        """Jobs already waiting that can share `first`'s batch; others go back to the queue in order."""
        if first.config.seed is not None and not first.config.greedy:
            return []
        taken: list[Job] = []
        others: list[Job | None] = []
        rows = len(first.prompt_ids)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if (job is not None and job.config == first.config and job.chat == first.chat
                    and rows + len(job.prompt_ids) <= self.max_batch_rows):
                taken.append(job)
                rows += len(job.prompt_ids)
            else:
                others.append(job)
        for job in others:
            self.jobs.put(job)
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


__all__ = ["GenerationWorker", "Job"]
