"""Megatron's ``--split`` (e.g. ``949,50,1``): train / validation / test parts of one corpus.

The split is over documents in the order the corpus holds them (file order), as Megatron-LM's
``_get_split_indices`` does it: contiguous index ranges, so the parts are disjoint and the same
on every rank and every run (no seed involved); each part's dataset then shuffles within
itself. A part is a :class:`CorpusView` that the datasets read like any corpus.
"""

from __future__ import annotations

import re

import numpy as np

from .stats import DataStats

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(text: str) -> tuple[float, float, float]:
    """Megatron's split string ("949,50,1", "90/10/0", "1,0") -> three weights summing to 1."""
    parts = [p for p in re.split(r"[,/]", str(text).replace(" ", "")) if p != ""]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{text!r}: expected up to three comma-separated weights (train,valid,test)")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r}: weights must be numbers") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{text!r}: weights must be >= 0 with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return tuple(w / total for w in weights)


def split_bounds(weights, num_documents: int) -> list[int]:
    """Document index bounds [0, a, b, n] of the parts (Megatron-LM's ``_get_split_indices``:
    rounded cumulative sizes, the rounding overshoot taken off every bound after the first)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    over = bounds[-1] - num_documents
    bounds[1:] = [b - over for b in bounds[1:]]
    return bounds


class CorpusView:
    """Documents ``start:stop`` of ``parent`` as a corpus of their own (no copy)."""

    def __init__(self, parent, start: int, stop: int, stats: DataStats | None = None):
        if not 0 <= start <= stop <= len(parent):
            raise ValueError(f"documents {start}:{stop} outside a corpus of {len(parent)}")
        self.parent, self.start, self.stop = parent, int(start), int(stop)
        self.lengths = np.asarray(parent.lengths[start:stop])
        self.stats = stats if stats is not None else DataStats(documents_read=len(self.lengths), tokens_in=int(self.lengths.sum()))

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def get(self, i: int) -> np.ndarray:
        return self.parent.get(self.start + int(i))

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        return self.parent.get_slice(self.start + int(i), start, length)

    def first_tokens(self) -> np.ndarray:
        return self.parent.first_tokens()[self.start : self.stop]

    def fingerprint(self) -> str:
        return f"{self.parent.fingerprint()}[{self.start}:{self.stop}]"


def split_corpus(corpus, weights) -> dict[str, CorpusView]:
    """{"train", "valid", "test"} views of ``corpus`` by ``weights`` (parse_split's). The train
    part keeps the reading stats of the whole corpus (what was read and skipped)."""
    bounds = split_bounds(weights, len(corpus))
    return {name: CorpusView(corpus, bounds[i], bounds[i + 1], stats=corpus.stats if name == "train" else None) for i, name in enumerate(SPLIT_NAMES)}
