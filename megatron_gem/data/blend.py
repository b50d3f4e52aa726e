"""Blends of several sources (Megatron-LM's ``--data-path W1 PATH1 W2 PATH2 ...``).

A :class:`CorpusBlend` holds one corpus per source (each a Megatron prefix or text files) and
the weights; it is also a corpus itself (the sources' documents one after the other), which is
what the self-supervised contrastive phase reads. :class:`BlendedDataset` mixes per-source
datasets (one :class:`PackedDataset` each) sample by sample, as Megatron's BlendedDataset does:

* A blend *epoch* has N = the sum of the sources' epoch-0 sample counts (one pass over
  everything). Source i gets exactly ``c_i`` samples of it: with weights, ``c_i`` is w_i * N
  rounded by largest remainder (|c_i - w_i N| < 1, sum N); without weights (Megatron's
  unweighted form) ``c_i`` is source i's own epoch size, i.e. weights proportional to size.
* The order inside an epoch is megatron-core's ``build_exhaustive_blending_indices`` over the
  counts (the deterministic greedy that always serves the source furthest behind its share).
  ``reference_blending_indices`` is the same loop in Python; a test ties the two.
* Source i's k-th sample of blend epoch e is its global sample ``e * c_i + k``: a source with
  more weight than rows repeats (each repeat is a new epoch of that source: new shuffle and
  layouts), one with less continues where the previous blend epoch stopped.

Everything is a function of the sources' document lengths, the weights and the seed, so the
global sample order is the same for any rank or worker count and resume is O(1) by index.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .corpus import _CorpusBase
from .datasets import _GlobalIndex
from .readers import DataError
from .stats import DataStats


def largest_remainder_counts(weights, total: int) -> np.ndarray:
    """Non-negative ints summing to ``total`` with |count_i - w_i * total| < 1 (w normalised);
    ties in the remainder go to the lower index."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    rest = int(total - counts.sum())
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def reference_blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """megatron-core's ``build_exhaustive_blending_indices`` (helpers.cpp) in plain Python:
    (source of each sample, its index within the source); source i appears exactly sizes[i] times."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    weights = [s / float(total) for s in sizes]
    counts = [0] * len(sizes)
    unspent = [i for i, s in enumerate(sizes) if s > 0]
    source = np.zeros(total, dtype=np.int16)
    index = np.zeros(total, dtype=np.int64)
    for n in range(total):
        best, best_err = -1, -np.inf
        for i in unspent:  # ascending, strict '>': ties go to the lower index, as in helpers.cpp
            err = weights[i] * max(float(n), 1.0) - counts[i]
            if err > best_err:
                best, best_err = i, err
        source[n], index[n] = best, counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return source, index


def blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """Same result as :func:`reference_blending_indices`, by megatron-core's compiled helper
    (the reference, pure Python, where megatron-core is not installed: a DeepSpeed-only set-up)."""
    try:
        with warnings.catch_warnings():  # megatron.core's import warns about TE/apex; irrelevant here
            warnings.simplefilter("ignore", UserWarning)
            from megatron.core.datasets import helpers_cpp
    except ImportError:
        return reference_blending_indices(sizes)
    sizes = np.asarray(sizes, dtype=np.int64)
    present = np.flatnonzero(sizes > 0)  # helpers.cpp would loop forever on a source of size 0
    total = int(sizes.sum())
    source = np.zeros(total, dtype=np.int16)
    index = np.zeros(total, dtype=np.int64)
    helpers_cpp.build_exhaustive_blending_indices(source, index, np.ascontiguousarray(sizes[present]), len(present))
    return present[source].astype(np.int16), index


class CorpusBlend(_CorpusBase):
    """The sources of a blend (``corpora[i]`` read from ``names[i]``) and their ``weights``
    (None: proportional to size, Megatron's unweighted form). As a corpus, document j is the
    sources' documents in order; ``stats`` merges what reading every source counted."""

    def __init__(self, corpora, names, weights=None):
        if len(corpora) != len(names) or (weights is not None and len(weights) != len(corpora)):
            raise ValueError("a blend needs one name (and one weight, if weighted) per source")
        if not 0 < len(corpora) < 2**15:
            raise ValueError(f"a blend needs 1 to {2**15 - 1} sources, got {len(corpora)}")
        if weights is not None and not all(np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive numbers, got {list(weights)}")
        self.corpora, self.names = list(corpora), [str(n) for n in names]
        self.weights = None if weights is None else [float(w) for w in weights]
        self.lengths = np.concatenate([np.asarray(c.lengths, dtype=np.int64) for c in self.corpora])
        self.doc_offsets = np.concatenate([[0], np.cumsum([len(c) for c in self.corpora])]).astype(np.int64)
        self.stats = DataStats()
        for c in self.corpora:
            self.stats.merge(c.stats)

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.doc_offsets, i, side="right")) - 1
        return s, int(i) - int(self.doc_offsets[s])

    def get(self, i: int) -> np.ndarray:
        s, j = self._locate(i)
        return self.corpora[s].get(j)

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        s, j = self._locate(i)
        return self.corpora[s].get_slice(j, start, length)

    def first_tokens(self) -> np.ndarray:
        return np.concatenate([c.first_tokens() for c in self.corpora])


class BlendedDataset(_GlobalIndex, torch.utils.data.Dataset):
    """Sample i (over all blend epochs) of ``datasets`` mixed by ``weights``; see the module doc.

    ``datasets`` share one ``collate`` (the same kind, seq_length and padding); each should be
    endless (``num_epochs=None``) or long enough for ``num_epochs`` blend epochs.
    """

    kind = "blend"

    def __init__(self, datasets, weights=None, *, names=None, num_epochs: int | None = None):
        if not datasets:
            raise ValueError("a blend needs at least one dataset")
        self.datasets, self.num_epochs = list(datasets), num_epochs
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(self.datasets))]
        self.source_epoch_sizes = np.array([d.samples_in_epoch(0) for d in self.datasets], dtype=np.int64)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.epoch_size = int(self.source_epoch_sizes.sum())
        if self.weights is None:
            self.counts = self.source_epoch_sizes.copy()
        else:
            if len(self.weights) != len(self.datasets):
                raise ValueError(f"{len(self.weights)} weights for {len(self.datasets)} datasets")
            self.counts = largest_remainder_counts(self.weights, self.epoch_size)
            for name, w, c in zip(self.names, self.weights, self.counts.tolist()):
                if c == 0:  # a source never read is a blend the user did not ask for
                    raise DataError(f"{name}: weight {w:g} gives it 0 of the {self.epoch_size} samples of a blend epoch; raise its weight")
        self.source, self.source_index = blending_indices(self.counts)

    def samples_in_epoch(self, epoch: int) -> int:
        return self.epoch_size

    def locate(self, index: int) -> tuple[int, int]:
        epoch, i = divmod(int(index), self.epoch_size)  # every blend epoch has the same size: O(1)
        if index < 0 or (self.num_epochs is not None and epoch >= self.num_epochs):
            raise IndexError(f"sample {index} is outside the blend's {self.num_epochs} epochs of {self.epoch_size}")
        return epoch, i

    def source_sample(self, index: int) -> tuple[int, int]:
        """(source, that source's global sample index) of blend sample ``index``."""
        epoch, j = self.locate(int(index))
        s = int(self.source[j])
        return s, epoch * int(self.counts[s]) + int(self.source_index[j])

    def __getitem__(self, index: int):
        s, k = self.source_sample(index)
        return self.datasets[s][k]

    def __len__(self) -> int:
        total = self.total_samples()
        if total is None:
            raise TypeError("an endless BlendedDataset (num_epochs=None) has no length")
        return total

    def collate(self, rows):
        return self.datasets[0].collate(rows)

    def epoch_stats(self, epoch: int = 0) -> DataStats:
        """The sources' epoch stats merged (each source's own epoch ``epoch``)."""
        s = DataStats()
        for d in self.datasets:
            s.merge(d.epoch_stats(epoch))
        return s

    def report(self) -> str:
        """Per source: its share of a blend epoch, in samples, and how many passes over it that is."""
        how = "weighted" if self.weights is not None else "unweighted: in proportion to size"
        lines = [f"[blend] {len(self.datasets)} sources, {self.epoch_size} samples per blend epoch ({how}):"]
        weights = self.weights or [None] * len(self.datasets)
        for name, w, c, n in zip(self.names, weights, self.counts.tolist(), self.source_epoch_sizes.tolist()):
            label = name if w is None else f"{name} (weight {w:g})"
            lines.append(f"[blend]   {label}: {c} samples per blend epoch ({c / self.epoch_size:.2%}) = {c / n:.2f} x its own epoch of {n}")
        return "\n".join(lines)

    def fingerprint(self) -> str:
        w = "size" if self.weights is None else ",".join(repr(x) for x in self.weights)
        return f"{self.kind}|weights:{w}|" + "|".join(f"[{d.fingerprint()}]" for d in self.datasets)

    def index_state(self) -> dict:
        return {"blend_sources": [d.index_state() for d in self.datasets]}

    def load_index_state(self, state: dict) -> None:
        for d, s in zip(self.datasets, state.get("blend_sources", [])):
            d.load_index_state(s)
