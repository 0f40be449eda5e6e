"""Cleaning at the door: exact de-duplication and two simple quality filters, applied while pre-tokenizing.

- `dedup`: a record whose normalised text (NFC, case-folded, runs of whitespace made one space) was
  already seen earlier in the build is dropped; the first copy in input order stays. Every kind.
- `min_chars`: a pretraining document shorter than this many characters (outer whitespace aside) is dropped.
- `max_repeated_lines`: a pretraining document whose share of non-blank lines that repeat an earlier line
  of the same document is above this is dropped (boilerplate, navigation menus, spam); 1.0 (no share is
  above it) is off.

All are off by default: a corpus is tokenized as given unless the user asks (docs/data.md, Cleaning).
The filters run in the encoding workers; duplicates are decided in the main process, in input order,
so the result is the same for any number of workers.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from minigpt.i18n import _

DROP_REASONS = ("duplicate", "too_short", "repetitive")
REHASH_BATCH = 1 << 18


@dataclass(frozen=True)
class Cleaning:
    """Which cleaning steps a build runs (the defaults: none)."""

    dedup: bool = False
    min_chars: int = 0
    max_repeated_lines: float = 1.0

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(_("min_chars must be 0 or more, got {value}").format(value=self.min_chars))
        if not 0.0 <= self.max_repeated_lines <= 1.0:
            raise ValueError(_("max_repeated_lines must be in [0, 1], got {value}").format(
                value=self.max_repeated_lines))

    @property
    def filters_documents(self) -> bool:
        return self.min_chars > 0 or self.max_repeated_lines < 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(text: str) -> str:
    """The text duplicates are compared by: NFC, case-folded, whitespace runs made one space, no outer space.

    NFC rather than NFKC: NFKC would also fold full-width letters and punctuation, but costs ~20 us per
    100 characters of Chinese (whose full-width punctuation it rewrites), as much as tokenizing them.
    """
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def text_hash(parts: list[str]) -> int:
    """A 64-bit hash of the normalised parts (the same in every process, unlike Python's `hash`)."""
    joined = "\0".join(normalise(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def repeated_line_share(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line of `text` (compared without outer whitespace)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def document_drop_reason(cleaning: Cleaning, text: str) -> str | None:
    """'too_short' or 'repetitive' when a pretraining document fails a filter, else None."""
    if cleaning.min_chars and len(text.strip()) < cleaning.min_chars:
        return "too_short"
    if cleaning.max_repeated_lines < 1.0 and repeated_line_share(text) > cleaning.max_repeated_lines:
        return "repetitive"
    return None


class DuplicateFilter:
    """The 64-bit hashes seen so far, in an open-addressing table of uint64 (0 marks an empty slot).

    Memory: 8 bytes a slot, kept between 35 and 70 percent full, so 11-23 bytes per distinct record
    (and both tables for a moment while it doubles). Two different texts share a hash with probability
    about n^2 / 2^65 for n records (3e-6 for 10 million): then the later one is dropped as a duplicate.
    """

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._table = np.zeros(capacity, dtype=np.uint64)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """True for each hash not seen before (nor earlier in `hashes`), which is then remembered."""
        keys = np.asarray(hashes, dtype=np.uint64)
        keys = np.where(keys == 0, np.uint64(1), keys)
        new = np.zeros(len(keys), dtype=bool)
        _unique, first = np.unique(keys, return_index=True)
        new[first] = True
        candidates = np.flatnonzero(new)
        self._reserve(self.count + len(candidates))
        new[candidates] = self._insert(keys[candidates])
        return new

    def _reserve(self, count: int) -> None:
        if count <= self.MAX_LOAD * len(self._table):
            return
        capacity = len(self._table)
        while count > self.MAX_LOAD * capacity:
            capacity *= 2
        old = self._table[self._table != 0]
        self._table = np.zeros(capacity, dtype=np.uint64)
        self.count = 0
        for start in range(0, len(old), REHASH_BATCH):  # in slices: the probing arrays stay small
            self._insert(old[start:start + REHASH_BATCH])

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct `keys`, probing linearly; True for each that was not in the table."""
        table, mask = self._table, np.uint64(len(self._table) - 1)
        fresh = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        slots = (keys & mask).astype(np.int64)
        while pending.size:
            held = table[slots]
            found = held == keys[pending]
            empty = np.flatnonzero(held == 0)
            # keys probing the same empty slot: the first takes it, the others probe on next round
            _slots, first = np.unique(slots[empty], return_index=True)
            winners = empty[first]
            table[slots[winners]] = keys[pending[winners]]
            fresh[pending[winners]] = True
            done = found
            done[winners] = True
            occupied = held != 0
            slots[occupied & ~found] = (slots[occupied & ~found] + 1) & int(mask)
            pending, slots = pending[~done], slots[~done]
        self.count += int(fresh.sum())
        return fresh
