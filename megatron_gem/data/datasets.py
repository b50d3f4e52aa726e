"""Datasets of packed rows and contrastive texts (map-style and streaming).

Sample arithmetic follows Megatron: a *sample* is one packed row (NTP) or one text
(contrastive). Samples are numbered globally across epochs (epoch 0's rows, then epoch 1's,
...). Two ways to get rows, same rows (given the same document order):
  PackedDataset          map-style over a corpus (in memory or .bin/.idx). Each epoch's plan
                         (pieces and rows) is computed from document lengths only, so any row
                         is available by index: worker count and resume point cannot change
                         it, resume is O(1).
  StreamingPackedDataset reads, tokenises and packs on the fly (inputs larger than memory,
                         hub streaming). Every rank runs the same stream and keeps its slice;
                         resume replays the stream up to consumed_samples. No shuffling.
The distributed loader over them: loader.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ..gem.config import GEMConfig
from ..gem.layout import trains_prefix_targets
from ..gem.roles import PAD_DOC_ID
from .packing import (
    DEFAULT_MAX_OPEN_ROWS,
    BestFitPacker,
    assemble_row,
    collate_rows,
    pack_lengths,
    pack_texts,
)
from .readers import Document, iter_documents, iter_hf_documents
from .samples import LAYOUT_NAMES, PiecePlan, SampleBuilder, epoch_order
from .stats import DataStats
from .tokenization import tokenize_stream


def _config_hash(config: GEMConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _plan_stats(plan: PiecePlan, num_rows: int, seq_length: int, k: int) -> DataStats:
    s = DataStats()
    s.rows = num_rows
    s.pieces = len(plan)
    s.tokens_out = int(plan.out_len.sum())
    s.padding_tokens = num_rows * seq_length - s.tokens_out
    codes, counts = np.unique(plan.layout, return_counts=True)
    s.layouts.update({LAYOUT_NAMES[int(c)]: int(n) for c, n in zip(codes, counts)})
    gem = plan.layout != 0
    s.special_tokens = int(gem.sum()) * k
    s.copied_tokens = s.tokens_out - int(plan.length.sum()) - s.special_tokens
    s.chunked_documents = int(np.unique(plan.doc[plan.start > 0]).shape[0])
    if plan.skipped_short:
        s.skip(SHORT_FOR_SUMMARY, plan.skipped_short)
    return s


# DataStats.skipped reason of summary mode's left-out pieces (samples.SampleBuilder.plan).
SHORT_FOR_SUMMARY = "too_short_for_summary_layout"


def _check_not_empty(plan: PiecePlan, config: GEMConfig) -> None:
    if len(plan) == 0 and plan.skipped_short:
        raise ValueError(
            f"summary mode: all {plan.skipped_short} document pieces are too short for the {config.layout!r} layout "
            f"(--gem-min-prefix-len {config.min_prefix_len}, --gem-min-suffix-len {config.min_suffix_len}); plain text trains nothing in summary mode"
        )


@dataclass
class EpochPlan:
    pieces: PiecePlan  # ordered row after row
    row_offsets: np.ndarray  # int64 [rows + 1]
    stats: DataStats

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets.shape[0] - 1)


class _GlobalIndex:
    """Maps a global sample index (across epochs) to (epoch, index in epoch)."""

    num_epochs: int | None

    def samples_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def total_samples(self) -> int | None:
        if self.num_epochs is None:
            return None
        return sum(self.samples_in_epoch(e) for e in range(self.num_epochs))

    def locate(self, index: int) -> tuple[int, int]:
        epoch = 0
        while True:
            if self.num_epochs is not None and epoch >= self.num_epochs:
                raise IndexError(f"sample {index} is past the last epoch ({self.num_epochs} epochs)")
            n = self.samples_in_epoch(epoch)
            if index < n:
                return epoch, index
            index -= n
            epoch += 1


class PackedDataset(_GlobalIndex, torch.utils.data.Dataset):
    """Packed NTP rows of a corpus; item i is the i-th row over all epochs.

    Per epoch: documents in a seeded order (``shuffle``) -> pieces (chunking + seeded layout) ->
    bounded best-fit packing. ``pad_id`` fills padding (never a target); ``bos_id`` (the
    tokenizer's BOS) keeps reconstruct from repeating it.
    """

    kind = "ntp"

    def __init__(
        self,
        corpus,
        config: GEMConfig,
        seq_length: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        max_open_rows: int = DEFAULT_MAX_OPEN_ROWS,
        pad_id: int = 0,
        bos_id: int | None = None,
    ):
        self.corpus, self.config, self.seq_length = corpus, config, int(seq_length)
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.max_open_rows, self.pad_id = int(max_open_rows), int(pad_id)
        self.builder = SampleBuilder(config, seq_length, seed=seed, bos_id=bos_id)
        self._plans: dict[int, EpochPlan] = {}
        self._rows_per_epoch: dict[int, int] = {}
        self._first = None
        if len(corpus) == 0:
            raise ValueError("the corpus holds no documents")

    # ------------------------------------------------------------------ plan
    def _first_tokens(self):
        if self._first is None and self.config.layout == "reconstruct" and self.builder.bos_id is not None:
            self._first = self.corpus.first_tokens()
        return self._first

    def plan(self, epoch: int) -> EpochPlan:
        """Pieces and rows of one epoch (cached for the two most recent epochs)."""
        if epoch in self._plans:
            return self._plans[epoch]
        order = epoch_order(len(self.corpus), self.seed, epoch, self.shuffle)
        first = self._first_tokens()
        pieces = self.builder.plan(order, self.corpus.lengths[order], epoch, None if first is None else first[order])
        _check_not_empty(pieces, self.config)
        offsets, item_order = pack_lengths(pieces.out_len, self.seq_length, self.max_open_rows)
        plan = EpochPlan(pieces.take(item_order), offsets, _plan_stats(pieces, len(offsets) - 1, self.seq_length, self.builder.k))
        known = self._rows_per_epoch.get(epoch)
        if known is not None and known != plan.num_rows:
            raise RuntimeError(
                f"epoch {epoch} packs into {plan.num_rows} rows but the loaded state says {known}: "
                "the data, seq_length, seed or GEMConfig differ from the checkpointed run"
            )
        self._rows_per_epoch[epoch] = plan.num_rows
        self._plans[epoch] = plan
        for old in sorted(self._plans)[:-2]:
            del self._plans[old]
        return plan

    def samples_in_epoch(self, epoch: int) -> int:
        if epoch not in self._rows_per_epoch:
            self.plan(epoch)
        return self._rows_per_epoch[epoch]

    def epoch_stats(self, epoch: int = 0) -> DataStats:
        """Reading stats of the corpus plus packing stats of the epoch."""
        s = DataStats().merge(self.corpus.stats)
        s.merge(self.plan(epoch).stats)
        return s

    # ------------------------------------------------------------------ rows
    def row(self, epoch: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row r of an epoch: (ids int64 [L], roles int8 [L], seg int64 [L], -1 on padding)."""
        plan = self.plan(epoch)
        a, b = int(plan.row_offsets[r]), int(plan.row_offsets[r + 1])
        p = plan.pieces
        L = self.seq_length
        ids = np.full(L, self.pad_id, dtype=np.int64)
        roles = np.zeros(L, dtype=np.int8)
        seg = np.full(L, PAD_DOC_ID, dtype=np.int64)
        pos = 0
        fields = (p.doc[a:b], p.start[a:b], p.length[a:b], p.layout[a:b], p.cut[a:b])
        for i, (d, start, n, layout, cut) in enumerate(zip(*(f.tolist() for f in fields))):
            end = self.builder.write(ids, roles, pos, self.corpus.get_slice(d, start, n), layout, cut, start == 0)
            seg[pos:end] = i
            pos = end
        return ids, roles, seg

    def __getitem__(self, index: int):
        return self.row(*self.locate(int(index)))

    def __len__(self) -> int:
        total = self.total_samples()
        if total is None:
            raise TypeError("an endless PackedDataset (num_epochs=None) has no length")
        return total

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return collate_rows(rows, prefix_targets=trains_prefix_targets(self.config))

    # ------------------------------------------------------------------ resume support
    def fingerprint(self) -> str:
        return (
            f"{self.kind}|{self.corpus.fingerprint()}|seq{self.seq_length}|seed{self.seed}|shuffle{int(self.shuffle)}"
            f"|open{self.max_open_rows}|gem{_config_hash(self.config)}"
        )

    def index_state(self) -> dict:
        return {"rows_per_epoch": {str(k): v for k, v in sorted(self._rows_per_epoch.items())}}

    def load_index_state(self, state: dict) -> None:
        for k, v in state.get("rows_per_epoch", {}).items():
            known = self._rows_per_epoch.get(int(k))
            if known is not None and known != v:
                raise RuntimeError(f"epoch {k}: {known} rows here, {v} in the loaded state")
            self._rows_per_epoch[int(k)] = int(v)


class ContrastiveDataset(_GlobalIndex, torch.utils.data.Dataset):
    """Texts for the contrastive phase; item i is the i-th text over all epochs.

    An item is an anchor (text + K specials, the ``embed`` layout) and its positive view:
    prefix dropout of the text + K specials (self-supervised, the paper), or, when
    ``positives`` (a corpus aligned with ``corpus``, e.g. :class:`PairCorpus`) is given, the
    paired text + K specials (supervised pairs); with ``embed_template`` (the config's
    embed_template, gem/template.py) every text is wrapped in it first. Texts longer than
    ``max_text_len - K`` (minus the template's tokens) are truncated (the specials and the
    template never are). ``collate`` packs a micro-batch of N items into rows of
    ``seq_length``: doc ids 0..N-1 are the anchors, N+j the positive view of anchor j.
    ``num_rows`` fixes the row count of every micro-batch (raises if the texts do not fit).

    ``negatives`` (a :class:`~megatron_gem.data.corpus.NegativeTexts` aligned with the pairs):
    each item also carries its record's hard negatives, laid out like positives; a micro-batch
    then holds ``num_negatives`` (M) more documents, 2N..2N+M-1, in item order.
    ``chunk_size`` C (GradCache, ``--contrastive-micro-batch-size``): a micro-batch of N > C
    items is collated as ``{"chunks": [...], "num_texts": N, "num_negatives": M, ...}``, each
    chunk the batch of C consecutive items (the last may be shorter) packed into its own rows,
    numbered like a micro-batch of its own (``chunk_spans``).

    ``texts`` (a :class:`~megatron_gem.data.texts.RawTexts` aligned with ``corpus``): each
    micro-batch (each chunk) also carries ``texts``, the raw strings of its documents in their
    order (anchors, positives, hard negatives), for a distillation teacher (distill/teacher_rows.py):
    the input's strings, never decoded tokens, without the query prompt or the template.
    """

    kind = "contrastive"

    def __init__(
        self,
        corpus,
        config: GEMConfig,
        *,
        max_text_len: int,
        seq_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        pad_id: int = 0,
        num_rows: int | None = None,
        positives=None,
        anchor_prompt=None,
        negatives=None,
        chunk_size: int | None = None,
        embed_template=None,
        texts=None,
    ):
        self.seq_length = int(seq_length if seq_length is not None else max_text_len)
        # tokens -> anchor tokens (tokenization.PromptedText: the query prompt of self-supervised
        # anchors; pairs get theirs as text when read, open_pair_corpus(query_prompt=)).
        self.anchor_prompt = anchor_prompt
        if max_text_len > self.seq_length:
            raise ValueError(f"max_text_len={max_text_len} exceeds seq_length={self.seq_length}")
        self.corpus, self.config, self.max_text_len = corpus, config, int(max_text_len)
        self.seed, self.shuffle, self.num_epochs, self.pad_id, self.num_rows = int(seed), bool(shuffle), num_epochs, int(pad_id), num_rows
        # embed_template: gem.template.EmbedTemplate of config.embed_template (needs the tokenizer).
        self.builder = SampleBuilder(config, self.seq_length, seed=seed, embed_template=embed_template)
        if self.max_text_len <= self.builder.k:
            raise ValueError(f"max_text_len={max_text_len} leaves no room beside K={self.builder.k} special tokens")
        self.builder._text_budget(self.max_text_len)  # the template fits and is the config's: fail here, not at the first batch
        self.positives, self.negatives, self.chunk_size = positives, negatives, chunk_size
        if negatives is not None and (positives is None or len(negatives) != len(corpus)):
            raise ValueError("hard negatives need pairs: one NegativeTexts entry per pair record")
        nonempty = np.asarray(corpus.lengths) > 0
        if positives is not None:
            if len(positives) != len(corpus):
                raise ValueError(f"positives hold {len(positives)} texts but the corpus {len(corpus)}: pairs must be aligned")
            nonempty &= np.asarray(positives.lengths) > 0
        if texts is not None and len(texts) != len(corpus):
            raise ValueError(f"raw texts hold {len(texts)} items but the corpus {len(corpus)}: they must be aligned")
        self.texts = texts
        self.valid = np.flatnonzero(nonempty)
        if self.valid.shape[0] == 0:
            raise ValueError("the corpus holds no non-empty text")
        self._order: tuple[int, np.ndarray] | None = None

    def samples_in_epoch(self, epoch: int) -> int:
        return int(self.valid.shape[0])

    def _epoch_docs(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.valid[epoch_order(self.valid.shape[0], self.seed, epoch, self.shuffle)])
        return self._order[1]

    def __getitem__(self, index: int):
        epoch, i = self.locate(int(index))
        d = int(self._epoch_docs(epoch)[i])
        positive = self.positives.get(d) if self.positives is not None else None
        text = self.corpus.get(d)
        prompted = self.anchor_prompt(text) if self.anchor_prompt is not None else None
        anchor, pos, cut = self.builder.embed_pair(text, d, epoch, self.max_text_len, positive, prompted)
        negs = [self.builder.embed_text(t, self.max_text_len) for t in self.negatives.get(d)] if self.negatives is not None else []
        if self.texts is not None:  # (.., hard negatives' layouts, raw texts): the teacher's input travels along
            raw = self.texts.get(d)
            if len(raw[2]) != len(negs):
                raise ValueError(f"item {d}: {len(negs)} hard negatives but {len(raw[2])} raw negative texts")
            return anchor, pos, cut + sum(c for _, c in negs), [layout for layout, _ in negs], raw
        if self.negatives is None:
            return anchor, pos, cut
        return anchor, pos, cut + sum(c for _, c in negs), [layout for layout, _ in negs]

    def __len__(self) -> int:
        total = self.total_samples()
        if total is None:
            raise TypeError("an endless ContrastiveDataset (num_epochs=None) has no length")
        return total

    def _pack(self, items) -> dict:
        n = len(items)
        negatives = [neg for it in items for neg in (it[3] if len(it) > 3 else ())]
        texts = [it[0] for it in items] + [it[1] for it in items] + negatives
        batch = collate_rows(pack_texts(texts, self.seq_length, pad_id=self.pad_id, num_rows=self.num_rows), renumber=False)
        batch["num_texts"] = n
        batch["num_negatives"] = len(negatives)
        batch["truncated_tokens"] = int(sum(it[2] for it in items))
        if self.texts is not None:  # the documents' raw strings, in the document order above
            raws = [it[4] for it in items]
            batch["texts"] = [r[0] for r in raws] + [r[1] for r in raws] + [t for r in raws for t in r[2]]
        return batch

    def collate(self, items) -> dict:
        spans = chunk_spans(len(items), self.chunk_size)
        if len(spans) == 1:
            return self._pack(items)
        chunks = [self._pack(items[a:b]) for a, b in spans]
        return {
            "chunks": chunks,
            "num_texts": len(items),
            "num_negatives": sum(c["num_negatives"] for c in chunks),
            "truncated_tokens": sum(c["truncated_tokens"] for c in chunks),
        }

    def epoch_stats(self, epoch: int = 0) -> DataStats:
        s = DataStats().merge(self.corpus.stats)
        budget = self.max_text_len - self.builder.k
        lengths = [np.asarray(side.lengths)[self.valid] for side in (self.corpus, self.positives) if side is not None]
        if self.negatives is not None:  # the negatives of the pairs in use
            n = self.negatives
            lengths.append(np.asarray(n.corpus.lengths)[np.concatenate([np.arange(n.offsets[d], n.offsets[d + 1]) for d in self.valid])])
        for side in lengths:
            over = side - budget
            s.truncated_texts += int((over > 0).sum())
            s.truncated_tokens += int(over[over > 0].sum())
        return s

    def fingerprint(self) -> str:
        pairs = f"|positives:{self.positives.fingerprint()}" if self.positives is not None else ""
        pairs += f"|negatives:{self.negatives.fingerprint()}" if self.negatives is not None else ""
        return (
            f"{self.kind}|{self.corpus.fingerprint()}{pairs}|len{self.max_text_len}|seq{self.seq_length}|seed{self.seed}"
            f"|shuffle{int(self.shuffle)}|gem{_config_hash(self.config)}"
        )

    def index_state(self) -> dict:
        return {}

    def load_index_state(self, state: dict) -> None:
        pass


def chunk_spans(num_items: int, chunk: int | None) -> list[tuple[int, int]]:
    """The GradCache chunk plan of a contrastive micro-batch: item ranges [start, stop) of C =
    ``chunk`` items (one range when chunk is None or >= num_items; the last may be shorter)."""
    if num_items < 1:
        raise ValueError(f"a contrastive micro-batch needs >= 1 item, got {num_items}")
    if chunk is None or chunk >= num_items:
        return [(0, num_items)]
    if chunk < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk}")
    return [(s, min(s + chunk, num_items)) for s in range(0, num_items, chunk)]


class StreamingPackedDataset:
    """Rows packed on the fly from a document stream, identical to PackedDataset(shuffle=False).

    ``source``: local paths (read with ``iter_documents``), ``"hf:<name>"`` or a ``datasets``
    object (``iter_hf_documents``, streaming), or a callable returning an iterable of texts.
    Reading options (text_field, txt_unit, on_bad, max_chars) go to the reader. Tokenisation
    runs ``num_proc`` processes. ``stats[epoch]`` fills in while an epoch is read.
    """

    kind = "ntp-stream"

    def __init__(
        self,
        source,
        tokenizer,
        config: GEMConfig,
        seq_length: int,
        *,
        seed: int = 0,
        num_epochs: int | None = 1,
        max_open_rows: int = DEFAULT_MAX_OPEN_ROWS,
        pad_id: int = 0,
        bos_id: int | None = None,
        num_proc: int = 1,
        add_special_tokens: bool = True,
        append_eod: bool = False,
        plan_batch: int = 256,
        **read_kwargs,
    ):
        self.source, self.tokenizer, self.config, self.seq_length = source, tokenizer, config, int(seq_length)
        self.seed, self.num_epochs, self.max_open_rows, self.pad_id = int(seed), num_epochs, int(max_open_rows), int(pad_id)
        self.builder = SampleBuilder(config, seq_length, seed=seed, bos_id=bos_id)
        self.tok_kwargs = dict(num_proc=num_proc, add_special_tokens=add_special_tokens, append_eod=append_eod)
        self.read_kwargs, self.plan_batch = read_kwargs, int(plan_batch)
        self.stats: dict[int, DataStats] = {}

    def _documents(self, stats: DataStats) -> Iterable:
        src = self.source
        if callable(src):
            return src()
        if isinstance(src, str) and src.startswith("hf:"):
            return iter_hf_documents(src[3:], stats=stats, **self.read_kwargs)
        if isinstance(src, (str, os.PathLike, list, tuple)):
            return iter_documents(src, stats=stats, **self.read_kwargs)
        return iter_hf_documents(src, stats=stats, **self.read_kwargs)

    def _pieces(self, epoch: int, stats: DataStats) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], int]]:
        texts = (d.text if isinstance(d, Document) else d for d in self._documents(stats))
        buf: list[np.ndarray] = []
        base = 0

        def flush(buf, base):
            lens = np.array([t.shape[0] for t in buf], dtype=np.int64)
            first = np.array([t[0] if t.shape[0] else -1 for t in buf], dtype=np.int64)
            plan = self.builder.plan(np.arange(base, base + len(buf)), lens, epoch, first)
            stats.tokens_in += int(lens.sum())
            pst = _plan_stats(plan, 0, self.seq_length, self.builder.k)
            for f in ("pieces", "tokens_out", "special_tokens", "copied_tokens", "chunked_documents"):
                setattr(stats, f, getattr(stats, f) + getattr(pst, f))
            stats.skipped.update(pst.skipped)
            stats.layouts.update(pst.layouts)
            for i in range(len(plan)):
                toks = buf[int(plan.doc[i]) - base]
                yield self.builder.build(toks, int(plan.start[i]), int(plan.length[i]), int(plan.layout[i]), int(plan.cut[i])), int(plan.out_len[i])

        for toks in tokenize_stream(texts, self.tokenizer, **self.tok_kwargs):
            buf.append(toks)
            if len(buf) == self.plan_batch:
                yield from flush(buf, base)
                base += len(buf)
                buf = []
        if buf:
            yield from flush(buf, base)

    def iter_rows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rows of one epoch, in order."""
        stats = self.stats[epoch] = DataStats()
        packer = BestFitPacker(self.seq_length, self.max_open_rows)

        def emit(rows):
            for r in rows:
                row = assemble_row(r, self.seq_length, self.pad_id)
                stats.rows += 1
                stats.padding_tokens += int((row[2] < 0).sum())
                yield row

        for piece, n in self._pieces(epoch, stats):
            yield from emit(packer.add(piece, n))
        yield from emit(packer.flush())

    def iter_all_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        epoch = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            empty = True
            for row in self.iter_rows(epoch):
                empty = False
                yield row
            if empty:
                raise ValueError("the document stream produced no rows")
            epoch += 1

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return collate_rows(rows, prefix_targets=trains_prefix_targets(self.config))

    def epoch_stats(self, epoch: int = 0) -> DataStats:
        return self.stats[epoch]

    def fingerprint(self) -> str:
        return (
            f"{self.kind}|{self.source if isinstance(self.source, (str, list, tuple)) else type(self.source).__name__}"
            f"|seq{self.seq_length}|seed{self.seed}|open{self.max_open_rows}|gem{_config_hash(self.config)}"
        )

    def index_state(self) -> dict:
        return {}

    def load_index_state(self, state: dict) -> None:
        pass
