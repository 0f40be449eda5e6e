"""Bits per byte and perplexity of the model on a text file, a JSONL file or a shard directory.

The input becomes one token stream as training sees it (each document's tokens then EOS; one EOS first,
so the first token is predicted from a document boundary too), cut into windows of `seq_len` inputs
that overlap by one token: every token after the first is predicted exactly once, from the context
inside its window. Bytes are counted per predicted token as in training's `val_bpb` (special tokens
count 0). The stream is read lazily, so inputs larger than memory work; every rank reads it all and
computes only its own batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigpt.data.shards import META, ShardError, ShardReader, open_shard
from minigpt.data.sources import (
    InputError,
    cut_long_text,
    input_format,
    iter_raw_records,
    record_columns,
    training_texts,
)
from minigpt.evaluation.context import EvalContext, EvalDataError
from minigpt.evaluation.spec import TaskSpec
from minigpt.i18n import _
from minigpt.metrics import MetricSums, token_byte_lengths

SUMS = ("loss_sum", "tokens", "bytes")
_CHUNK = 1 << 20


def _text_documents(path: Path, text_field: str) -> Iterator[str]:
    fmt = input_format(path)
    for _line, raw in iter_raw_records(path, record_columns(None, text_field)):
        for text in training_texts(fmt, raw, text_field):
            yield from cut_long_text(text)


def _open_shard(spec: TaskSpec, tokenizer) -> ShardReader:
    path = spec.path
    if (path / META).is_file():
        reader = ShardReader(path)
    else:
        reader = open_shard(path, spec.get("split", "val"))
    if tokenizer is not None and reader.checksum != tokenizer.checksum:
        raise ShardError(_("{path}: built with tokenizer {built}, the model uses {used}; pre-tokenize the data with "
                           "the model's tokenizer").format(path=reader.directory / META, built=reader.checksum[:12],
                                                           used=tokenizer.checksum[:12]))
    return reader


def token_chunks(spec: TaskSpec, tokenizer) -> tuple[Iterator[np.ndarray], int | None]:
    """The task's token stream in chunks (EOS first), and its length in tokens when known up front."""
    path = spec.path
    if path.is_dir():
        reader = _open_shard(spec, tokenizer)

        def from_shard() -> Iterator[np.ndarray]:
            yield np.array([tokenizer.eos_id], dtype=np.int64)
            for start in range(0, reader.num_tokens, _CHUNK):
                yield np.asarray(reader.tokens[start:start + _CHUNK], dtype=np.int64)
        return from_shard(), reader.num_tokens + 1
    if not path.is_file():
        raise EvalDataError(_("{task}: {path} is neither a file nor a shard directory").format(task=spec.text,
                                                                                               path=path))
    try:
        input_format(path)
    except InputError as err:
        raise EvalDataError(_("{task}: {error}").format(task=spec.text, error=err)) from None

    def from_text() -> Iterator[np.ndarray]:
        yield np.array([tokenizer.eos_id], dtype=np.int64)
        for text in _text_documents(path, spec.get("field", "text")):
            yield np.array(tokenizer.encode(text) + [tokenizer.eos_id], dtype=np.int64)
    return from_text(), None


def windows(chunks: Iterator[np.ndarray], seq_len: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Windows of up to `seq_len + 1` tokens overlapping by one; at most `max_tokens` predicted tokens."""
    buffer = np.zeros(0, dtype=np.int64)
    predicted = 0
    for chunk in chunks:
        buffer = np.concatenate([buffer, chunk])
        while len(buffer) >= seq_len + 1:
            window, buffer = buffer[:seq_len + 1], buffer[seq_len:]
            if max_tokens is not None and predicted + seq_len >= max_tokens:
                yield window[:max_tokens - predicted + 1]
                return
            predicted += seq_len
            yield window
    if len(buffer) > 1:
        if max_tokens is not None:
            buffer = buffer[:max_tokens - predicted + 1]
        yield buffer


def _batch_tensors(batch: list[np.ndarray], seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.zeros((len(batch), seq_len), dtype=torch.long)
    labels = torch.full((len(batch), seq_len), -100, dtype=torch.long)
    for row, window in enumerate(batch):
        tokens = torch.from_numpy(window)
        inputs[row, :len(window) - 1] = tokens[:-1]
        labels[row, :len(window) - 1] = tokens[1:]
    return inputs.to(device), labels.to(device)


@torch.no_grad()
def _score(ctx: EvalContext, batch: list[np.ndarray], seq_len: int, byte_lengths: torch.Tensor,
           sums: MetricSums | None) -> None:
    inputs, labels = _batch_tensors(batch, seq_len, ctx.device)
    logits = ctx.model(inputs)
    flat = labels.flatten()
    losses = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=-100, reduction="none")
    kept = flat != -100
    if sums is not None:
        sums.add("loss_sum", losses[kept].double().sum().item())
        sums.add("tokens", kept.sum().item())
        sums.add("bytes", byte_lengths[flat[kept].cpu()].sum().item())


def evaluate_bpb(spec: TaskSpec, ctx: EvalContext) -> dict[str, float]:
    """bpb, nats per token, perplexity, tokens and bytes of the model on the task's input."""
    tokenizer = ctx.tokenizer
    seq_len = min(spec.get("seq_len", ctx.max_seq_len), ctx.max_seq_len)
    chunks, known = token_chunks(spec, tokenizer)
    max_tokens = spec.get("max_tokens")
    limits = [n for n in (known - 1 if known else None, max_tokens) if n]
    total = min(limits) if limits else None
    byte_lengths = token_byte_lengths(tokenizer)
    sums = MetricSums(SUMS)
    batch: list[np.ndarray] = []
    index = computed = 0
    with ctx.bar(spec.name, total, "tok") as bar:
        for window in windows(chunks, seq_len, max_tokens):
            batch.append(window)
            bar.update(len(window) - 1)
            if len(batch) == ctx.batch_size:
                if ctx.owns(index):
                    _score(ctx, batch, seq_len, byte_lengths, sums)
                    computed += 1
                index, last, batch = index + 1, batch, []
        if batch:
            if ctx.owns(index):
                _score(ctx, batch, seq_len, byte_lengths, sums)
                computed += 1
            index, last = index + 1, batch
    for _owed in range(ctx.owed_batches(index, computed)):
        _score(ctx, last, seq_len, byte_lengths, None)
    reduced = ctx.reduce(sums)
    if reduced["tokens"] == 0:
        raise EvalDataError(_("{task}: no text to evaluate in {path}").format(task=spec.text, path=spec.path))
    nats = reduced["loss_sum"] / reduced["tokens"]
    return {"bpb": reduced["loss_sum"] / math.log(2) / max(reduced["bytes"], 1.0), "nats_per_token": nats,
            "perplexity": math.exp(min(nats, 700.0)), "tokens": int(reduced["tokens"]),
            "bytes": int(reduced["bytes"])}
