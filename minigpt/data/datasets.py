"""Map-style datasets over a shard reader, one per training mode.

Each has `len()` and `[index]` returning a dict of int64 numpy arrays; none holds a random
generator (order is the sampler's job), so the same index always gives the same sample.
Labels are the next tokens, -100 where no loss is taken.
"""

from __future__ import annotations

import bisect

import numpy as np

from minigpt.data.shards import ShardError, ShardReader
from minigpt.i18n import _

IGNORE_INDEX = -100
"""Label of a position that takes no loss (prompt, padding); the one definition every loss imports."""


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(_("index {index} out of range for {length} samples").format(index=index, length=length))
    return index


def _require_kind(reader: ShardReader, kind: str, user: str) -> None:
    if reader.kind != kind:
        raise ShardError(_("{path}: {user} needs {kind} shards, this shard is of kind {shard_kind!r}").format(
            path=reader.directory / "meta.json", user=user, kind=kind, shard_kind=reader.kind))


class PretrainWindows:
    """Non-overlapping windows of `seq_len` tokens over the flat stream (EOS ends every document).

    With `segment_ids=True` each sample also has the index of each token's document within the
    window (0, 1, ...), for attention that stays inside a document.
    """

    def __init__(self, reader: ShardReader, seq_len: int, segment_ids: bool = False):
        if seq_len < 1:
            raise ValueError(_("seq_len must be positive, got {value}").format(value=seq_len))
        self.reader, self.seq_len, self.segment_ids = reader, seq_len, segment_ids

    def __len__(self) -> int:
        return max(0, (self.reader.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = _check_index(index, len(self)) * self.seq_len
        chunk = self.reader.window(start, self.seq_len + 1).astype(np.int64)
        sample = {"input_ids": chunk[:-1], "labels": chunk[1:]}
        if self.segment_ids:
            positions = np.arange(start, start + self.seq_len)
            documents = np.searchsorted(self.reader.offsets, positions, side="right") - 1
            sample["segment_ids"] = (documents - documents[0]).astype(np.int64)
        return sample


def _chat_pieces(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one rendered conversation, cut to at most `seq_len` positions, unpadded."""
    ids = ids.astype(np.int64)
    return ids[:-1][:seq_len], np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)[:seq_len]


def _chat_sample(ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one rendered conversation, truncated or right-padded to `seq_len`."""
    inputs, labels = _chat_pieces(ids, mask, seq_len)
    pad = seq_len - len(inputs)
    return (np.concatenate([inputs, np.full(pad, pad_id, dtype=np.int64)]),
            np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)]))


class SFTExamples:
    """One conversation per sample; labels only on assistant tokens (and their end-of-turn).

    Conversations longer than `seq_len + 1` tokens are cut; `num_truncated` counts them.
    """

    def __init__(self, reader: ShardReader, seq_len: int, pad_id: int):
        _require_kind(reader, "sft", "SFTExamples")
        self.reader, self.seq_len, self.pad_id = reader, seq_len, pad_id
        self.num_truncated = int(np.sum(reader.document_lengths() > seq_len + 1))

    def __len__(self) -> int:
        return self.reader.num_documents

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self))
        inputs, labels = _chat_sample(self.reader.document(index), self.reader.document_mask(index),
                                      self.seq_len, self.pad_id)
        return {"input_ids": inputs, "labels": labels}


def pack_best_fit(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of at most `capacity` for items of `sizes` (each 1..capacity): best-fit decreasing.

    Returns (members, offsets): bin b holds items `members[offsets[b]:offsets[b + 1]]`, largest first.
    Deterministic (a stable sort, ties by index); best-fit decreasing needs at most 11/9 of the fewest bins
    possible, plus one. Open bins are kept by the room they have left: seconds for a million items."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    open_by_room: list[list[int]] = [[] for _room in range(capacity + 1)]
    rooms: list[int] = []  # sorted, the rooms at least one open bin has left
    bin_of = [0] * len(order)
    bins = 0
    for item, need in zip(order.tolist(), sizes[order].tolist(), strict=True):
        at = bisect.bisect_left(rooms, need)
        if at < len(rooms):  # the fullest open bin it fits in
            room = rooms[at]
            target = open_by_room[room].pop()
            if not open_by_room[room]:
                del rooms[at]
        else:
            room, target, bins = capacity, bins, bins + 1
        bin_of[item] = target
        if room > need:
            if not open_by_room[room - need]:
                bisect.insort(rooms, room - need)
            open_by_room[room - need].append(target)
    placed = np.asarray(bin_of, dtype=np.int64)[order]
    by_bin = np.argsort(placed, kind="stable")  # each bin's items stay in the order they were placed
    return order[by_bin], np.searchsorted(placed[by_bin], np.arange(bins + 1))


class PackedSFTExamples:
    """Several whole conversations per sample (`--pack`): the SFT data in far fewer, fuller sequences.

    The conversations are placed once, deterministically, by best-fit decreasing on their lengths, so a
    sample index always means the same sequence and the sampler resumes as with `SFTExamples`. Each sample
    carries `segment_ids` (the conversation's index within the sequence: attention stays inside it) and
    `position_ids` that restart at 0 for every conversation, so each one is trained exactly as if it were
    alone in its sequence. Labels stay on assistant tokens only; the tail is padding (its own segment).
    A conversation longer than `seq_len + 1` tokens is cut and fills a sample alone; `num_truncated`
    counts them, `num_conversations` the conversations placed, `padding_share` the positions left as padding.
    """

    def __init__(self, reader: ShardReader, seq_len: int, pad_id: int):
        _require_kind(reader, "sft", "PackedSFTExamples")
        self.reader, self.seq_len, self.pad_id = reader, seq_len, pad_id
        lengths = reader.document_lengths()
        self.num_truncated = int(np.sum(lengths > seq_len + 1))
        positions = np.minimum(lengths.astype(np.int64) - 1, seq_len)
        placed = np.flatnonzero(positions > 0)  # a one-token document has no position to train
        members, self.offsets = pack_best_fit(positions[placed], seq_len)
        self.members = placed[members]
        self.num_conversations = len(self.members)
        filled = int(positions[placed].sum())
        self.padding_share = 1 - filled / (len(self) * seq_len) if len(self) else 0.0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self))
        conversations = self.members[self.offsets[index]:self.offsets[index + 1]]
        inputs = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        segments = np.full(self.seq_len, len(conversations), dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        start = 0
        for segment, document in enumerate(conversations):
            ids, targets = _chat_pieces(self.reader.document(document), self.reader.document_mask(document),
                                        self.seq_len)
            end = start + len(ids)
            inputs[start:end], labels[start:end], segments[start:end] = ids, targets, segment
            positions[start:end] = np.arange(len(ids))
            start = end
        positions[start:] = np.arange(self.seq_len - start)
        return {"input_ids": inputs, "labels": labels, "segment_ids": segments, "position_ids": positions}


class DPOPairs:
    """Preference pairs: documents 2i (chosen) and 2i+1 (rejected), each prompt + response.

    Labels are -100 on the prompt and padding, so summing log-probs where labels != -100 gives
    the response's log-probability. `num_truncated` counts pairs where either side was cut.
    """

    def __init__(self, reader: ShardReader, seq_len: int, pad_id: int):
        _require_kind(reader, "dpo", "DPOPairs")
        self.reader, self.seq_len, self.pad_id = reader, seq_len, pad_id
        too_long = (reader.document_lengths() > seq_len + 1).reshape(-1, 2)
        self.num_truncated = int(np.sum(too_long.any(axis=1)))

    def __len__(self) -> int:
        return self.reader.num_documents // 2

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self))
        sample = {}
        for side, document in (("chosen", 2 * index), ("rejected", 2 * index + 1)):
            inputs, labels = _chat_sample(self.reader.document(document), self.reader.document_mask(document),
                                          self.seq_len, self.pad_id)
            sample[f"{side}_input_ids"], sample[f"{side}_labels"] = inputs, labels
        return sample


class RLHFPrompts:
    """Prompts rendered up to the open assistant header, ready for generation (variable length).

    `record(i)` gives the prompt's stored fields: its messages, `reference` answer (or None) and
    any other fields of the input record (e.g. `task` for `minigpt.data.tasks.reward`).
    """

    def __init__(self, reader: ShardReader):
        _require_kind(reader, "rlhf", "RLHFPrompts")
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_documents

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self))
        return {"prompt_ids": self.reader.document(index).astype(np.int64)}

    def record(self, index: int) -> dict:
        return self.reader.records[_check_index(index, len(self))]

    def reference(self, index: int) -> str | None:
        return self.record(index).get("reference")
