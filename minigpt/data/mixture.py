"""Weighted data mixtures: `--data NAME=PATH:WEIGHT` entries, parsed and checked.

`--data web=shards/web:0.7 --data books=corpus/books.jsonl:0.3` trains on two sources, 70% and 30% of
the tokens. NAME is letters, digits, `_` and `-` (it names the metrics: `tokens/web`, `val_loss/web`);
PATH is anything a plain `--data` entry may be (a shard directory, a raw file, `demo:en`); WEIGHT is a
positive number after the last colon (weights need not add up to 1: they are shares of their sum).
Either every entry is weighted or none is. A file whose name itself looks like `NAME=...` is given as
`./NAME=...`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from minigpt.i18n import _

NAMED = re.compile(r"^([A-Za-z0-9_-]+)=(.*)$", re.DOTALL)
"""A weighted entry: NAME=REST (NAME cannot hold a `/` or `.`, so `./a=b.txt` is a plain path)."""


class MixtureError(ValueError):
    """A `--data` mixture entry that cannot be read; the message quotes the entry."""


@dataclass(frozen=True)
class WeightedSource:
    """One source of a mixture: its name (metrics, logs), what `--data` would take alone, and its weight."""

    name: str
    path: str
    weight: float


def parse_source(entry: str) -> WeightedSource | None:
    """The weighted source an entry names, or None for a plain `--data` entry."""
    match = NAMED.match(entry)
    if match is None:
        return None
    name, rest = match.groups()
    path, colon, weight_text = rest.rpartition(":")
    if not colon:
        raise MixtureError(_("--data {entry}: no weight; a named source is NAME=PATH:WEIGHT (e.g. "
                             "web=shards/web:0.7)").format(entry=entry))
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise MixtureError(_("--data {entry}: the weight of {name} must be a positive number, got {weight!r}").format(
            entry=entry, name=name, weight=weight_text))
    if not path:
        raise MixtureError(_("--data {entry}: source {name} has a weight but no path (NAME=PATH:WEIGHT)").format(
            entry=entry, name=name))
    return WeightedSource(name, path, weight)


def parse_mixture(entries: list[str]) -> list[WeightedSource]:
    """The weighted sources of `--data`, or [] when its entries are plain (the single-dataset run).

    Refuses, naming the entry: a missing or non-positive weight, a weight without a path, a name given
    twice, and weighted entries mixed with plain ones."""
    parsed = [parse_source(entry) for entry in entries]
    sources = [source for source in parsed if source is not None]
    if not sources:
        return []
    plain = [entry for entry, source in zip(entries, parsed, strict=True) if source is None]
    if plain:
        raise MixtureError(_("--data {entry}: no NAME= and :WEIGHT, but other entries are weighted; give every "
                             "source of a mixture as NAME=PATH:WEIGHT").format(entry=plain[0]))
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise MixtureError(_("--data: source name {name!r} is given twice; each source needs its own name").format(
                name=source.name))
        seen.add(source.name)
    return sources


def data_paths(entries: list[str]) -> list[str]:
    """What each `--data` entry reads: the PATH of a weighted entry, a plain entry as it is."""
    return [source.path if source else entry for entry, source in zip(entries, map(parse_source, entries),
                                                                      strict=True)]
