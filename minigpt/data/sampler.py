"""A resumable, world-size-independent sampler of dataset indices.

Each optimizer step consumes one *global batch* of `micro_batch_size x grad_accum x world_size`
indices from a seeded permutation of the dataset (a new permutation per epoch; a short tail that
cannot fill a global batch is dropped). Rank r's micro-step m takes slice `m * world_size + r` of it.
The state is global (epoch, position), so a run saved on N ranks resumes on M ranks with the same
global batch and sees exactly the samples it would have seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minigpt.i18n import _


@dataclass
class SamplerState:
    """Where the sampler stands: the epoch and how many of its permuted indices are consumed."""

    epoch: int = 0
    position: int = 0


class SamplerError(ValueError):
    """The data cannot fill the batches asked for, or a sampler state does not fit this data."""


class ResumableSampler:
    """Yields this rank's micro-batches of indices, step after step, for as many steps as asked."""

    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_samples < self.global_batch:
            raise SamplerError(_(
                "dataset has {samples} samples but one optimizer step needs {global_batch} (micro-batch "
                "{micro_batch} x accumulation {grad_accum} x {world_size} ranks): use more data, a shorter --seq-len "
                "or a smaller batch").format(samples=num_samples, global_batch=self.global_batch,
                                             micro_batch=micro_batch_size, grad_accum=grad_accum,
                                             world_size=world_size))
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.state = SamplerState()
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def next_step(self) -> list[np.ndarray]:
        """This rank's `grad_accum` micro-batches of indices for the next optimizer step."""
        if self.state.position + self.global_batch > self.num_samples:
            self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
        order = self._permutation(self.state.epoch)
        window = order[self.state.position:self.state.position + self.global_batch]
        self.state.position += self.global_batch
        micro = self.micro_batch_size
        return [window[(m * self.world_size + self.rank) * micro:(m * self.world_size + self.rank + 1) * micro]
                for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {**asdict(self.state), "seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state`; the dataset and global batch must be the ones the state was taken with.
        A field of the wrong type or out of range is a `SamplerError` naming it (`sampler.position`)."""
        for name in ("num_samples", "global_batch", "seed", "epoch", "position"):
            if name not in state:
                raise SamplerError(_("sampler.{name}: missing from the sampler state").format(name=name))
            value = state[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SamplerError(_("sampler.{name} must be a non-negative integer, got {value!r}").format(
                    name=name, value=str(value)[:40]))
        if state["num_samples"] != self.num_samples:
            raise SamplerError(_("sampler state is for a dataset of {saved} samples, this one has {samples}: the "
                                 "data changed since the checkpoint").format(saved=state["num_samples"],
                                                                             samples=self.num_samples))
        if state["global_batch"] != self.global_batch:
            raise SamplerError(_("sampler state is for a global batch of {saved}, this run uses {global_batch}: "
                                 "keep micro-batch x accumulation x ranks equal to resume").format(
                saved=state["global_batch"], global_batch=self.global_batch))
        if state["position"] > self.num_samples:
            raise SamplerError(_("sampler.position must be an integer from 0 to {samples} (the dataset's samples), "
                                 "got {position}").format(samples=self.num_samples, position=state["position"]))
        self.seed = state["seed"]
        self.state = SamplerState(epoch=state["epoch"], position=state["position"])
