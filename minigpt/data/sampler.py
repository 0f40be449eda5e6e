"""A resumable, world-size-independent sampler of dataset indices.

Each optimizer step consumes one *global batch* of `micro_batch_size x grad_accum x world_size`
indices from a seeded permutation of the dataset (a new permutation per epoch; a short tail that
cannot fill a global batch is dropped). Rank r's micro-step m takes slice `m * world_size + r` of it.
The state is global (epoch, position), so a run saved on N ranks resumes on M ranks with the same
global batch and sees exactly the samples it would have seen.

`MixtureSampler` does the same over several weighted sources (`--data NAME=PATH:WEIGHT`): stride
scheduling decides which source fills each slot of the global batch, and each source walks its own
seeded permutation, epoch after epoch, so a small source repeats while a large one is still in its first
pass. Its state is the number of samples drawn from each source: global, so it resumes on any world size.
"""

from __future__ import annotations

import zlib
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
        if "sources" in state:
            raise SamplerError(_("sampler state is of a mixture of sources {names}; this run trains on one "
                                 "dataset: resume with the same --data NAME=PATH:WEIGHT entries").format(
                names=", ".join(map(str, state["sources"]))))
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


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class MixtureSampler:
    """Yields this rank's micro-batches of indices into the sources laid end to end (source k's sample i is
    index `offsets[k] + i`), the sources drawn in proportion to their weights.

    Slot after slot of the global batch goes to the source whose next sample is due first: the one with
    the smallest `(drawn + 1) / weight` (ties to the earlier source). This is stride scheduling (smooth
    weighted round robin): deterministic, no random draw, and after any number of samples each source's
    count is within one sample of its exact share; a seeded random draw would drift by about the square
    root of the count. Every sample is `seq_len` tokens, so shares of samples are shares of tokens.
    """

    def __init__(self, names: list[str], num_samples: list[int], weights: list[float], micro_batch_size: int,
                 grad_accum: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        for name, count in zip(names, num_samples, strict=True):
            if count < 1:
                raise SamplerError(_("source {name} has no training samples: give it more data or a shorter "
                                     "--seq-len").format(name=name))
        self.names, self.num_samples, self.weights = list(names), list(num_samples), list(weights)
        self.offsets = np.cumsum([0] + self.num_samples)[:-1].tolist()
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.micro_batch_size, self.grad_accum, self.rank, self.world_size = micro_batch_size, grad_accum, rank, world_size
        self.seed = seed
        self.drawn = [0] * len(self.names)
        """Samples drawn from each source so far, over all ranks: the whole state (epoch = drawn // size)."""
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def epochs(self) -> dict[str, float]:
        """Passes over each source so far (1.5: its second epoch is half done)."""
        return {name: drawn / size for name, drawn, size in zip(self.names, self.drawn, self.num_samples, strict=True)}

    def _order(self, source: int, epoch: int) -> np.ndarray:
        """Source `source`'s permutation for `epoch`: seeded by the run's seed, the source's name and the epoch."""
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            key = [self.seed, zlib.crc32(self.names[source].encode("utf-8")), epoch]
            cached = self._orders[source] = (epoch, np.random.default_rng(key).permutation(self.num_samples[source]))
        return cached[1]

    def next_global_batch(self) -> np.ndarray:
        """The next step's global batch of indices (every rank computes the same)."""
        slots = self.global_batch
        # Each source's next `slots` due times, (drawn + j) / weight; the batch takes the `slots` earliest of all
        # (ties to the earlier source): the same as picking the most overdue source slot after slot.
        due = (np.asarray(self.drawn, dtype=np.float64)[:, None] + np.arange(1, slots + 1)) / \
            np.asarray(self.weights, dtype=np.float64)[:, None]
        sources = np.repeat(np.arange(len(self.names)), slots)
        chosen = sources[np.lexsort((sources, due.ravel()))[:slots]]
        window = np.empty(slots, dtype=np.int64)
        for source in range(len(self.names)):
            where = np.flatnonzero(chosen == source)
            window[where] = self.offsets[source] + self._take(source, len(where))
        return window

    def _take(self, source: int, count: int) -> np.ndarray:
        """Source `source`'s next `count` samples, epoch after epoch of its permutations."""
        taken = []
        while count:
            epoch, position = divmod(self.drawn[source], self.num_samples[source])
            part = self._order(source, epoch)[position:position + count]
            taken.append(part)
            self.drawn[source] += len(part)
            count -= len(part)
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)

    def next_step(self) -> list[np.ndarray]:
        """This rank's `grad_accum` micro-batches of indices for the next optimizer step."""
        window, micro = self.next_global_batch(), self.micro_batch_size
        return [window[(m * self.world_size + self.rank) * micro:(m * self.world_size + self.rank + 1) * micro]
                for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "global_batch": self.global_batch,
                "sources": {name: {"drawn": drawn, "num_samples": size, "weight": weight}
                            for name, drawn, size, weight in zip(self.names, self.drawn, self.num_samples,
                                                                 self.weights, strict=True)}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state`: the same sources (names, sizes, weights) and global batch, any world size.
        A field that does not fit is a `SamplerError` naming it (`sampler.sources.web.drawn`)."""
        if "sources" not in state:
            raise SamplerError(_("sampler state is of a run on one dataset; this run mixes sources {names}: resume "
                                 "with the --data it was started with").format(names=", ".join(self.names)))
        sources = state["sources"]
        if not isinstance(sources, dict) or list(sources) != self.names:
            raise SamplerError(_("sampler state mixes sources {saved}, this run {names}: resume with the same --data "
                                 "NAME=PATH:WEIGHT entries").format(
                saved=", ".join(map(str, sources)) if isinstance(sources, dict) else repr(sources)[:40],
                names=", ".join(self.names)))
        for name in ("seed", "global_batch"):
            if not _non_negative_int(state.get(name)):
                raise SamplerError(_("sampler.{name} must be a non-negative integer, got {value!r}").format(
                    name=name, value=str(state.get(name))[:40]))
        if state["global_batch"] != self.global_batch:
            raise SamplerError(_("sampler state is for a global batch of {saved}, this run uses {global_batch}: "
                                 "keep micro-batch x accumulation x ranks equal to resume").format(
                saved=state["global_batch"], global_batch=self.global_batch))
        drawn = []
        for name, size, weight in zip(self.names, self.num_samples, self.weights, strict=True):
            saved = sources[name] if isinstance(sources[name], dict) else {}
            for field in ("drawn", "num_samples"):
                if not _non_negative_int(saved.get(field)):
                    raise SamplerError(_("sampler.sources.{name}.{field} must be a non-negative integer, got "
                                         "{value!r}").format(name=name, field=field,
                                                             value=str(saved.get(field))[:40]))
            if saved["num_samples"] != size:
                raise SamplerError(_("sampler state is for a source {name} of {saved} samples, this one has "
                                     "{samples}: the data changed since the checkpoint").format(
                    name=name, saved=saved["num_samples"], samples=size))
            if saved.get("weight") != weight:
                raise SamplerError(_("sampler state gives source {name} weight {saved!r}, this run {weight}: resume "
                                     "with the weights the run started with").format(
                    name=name, saved=saved.get("weight"), weight=weight))
            drawn.append(saved["drawn"])
        self.seed, self.drawn = state["seed"], drawn
