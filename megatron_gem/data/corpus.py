"""A *corpus*: random access to tokenised documents by index.

:class:`InMemoryCorpus` tokenises texts into one flat array; :class:`IndexedCorpus` reads
Megatron ``.bin/.idx`` files (data/indexed.py, the format megatron-core's ``IndexedDataset`` reads). Both expose
``lengths`` (int64 [num_docs]) and ``get(i)`` (int64 tokens), so the packing code above them is
the same for every input kind. ``open_corpus`` / ``open_pair_corpus`` open any input kind.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .indexed import IndexedFile
from .readers import (
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    DataError,
    Document,
    TextList,
    _suffix,
    read_source,
    resolve_paths,
)
from .stats import DataStats
from .tokenization import tokenize_stream

if TYPE_CHECKING:
    from .texts import RawTexts


class _CorpusBase:
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        """Tokens ``start:start+length`` of document i (any integer dtype)."""
        return self.get(i)[start : start + length]

    def first_tokens(self) -> np.ndarray:
        """First token of every document (-1 for an empty one)."""
        return np.array([self.get(i)[0] if self.lengths[i] else -1 for i in range(len(self))], dtype=np.int64)

    def fingerprint(self) -> str:
        """Identifies the corpus content shape (document count and lengths) for resume checks."""
        h = hashlib.sha256(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes()).hexdigest()[:16]
        return f"{len(self)}docs-{self.num_tokens}tok-{h}"


class InMemoryCorpus(_CorpusBase):
    """Tokenised documents held in one flat array (int32 when the ids fit) plus offsets."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, stats: DataStats | None = None):
        self.tokens = tokens
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        self.stats = stats if stats is not None else DataStats(documents_read=len(self.lengths), tokens_in=int(self.lengths.sum()))

    @classmethod
    def from_token_arrays(cls, docs: Iterable[np.ndarray], stats: DataStats | None = None) -> "InMemoryCorpus":
        docs = [np.asarray(d) for d in docs]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        if docs:
            np.cumsum([d.shape[0] for d in docs], out=offsets[1:])
        flat = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
        if flat.size and flat.max() < 2**31:
            flat = flat.astype(np.int32)
        return cls(flat, offsets, stats)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str | Document],
        tokenizer,
        *,
        stats: DataStats | None = None,
        batch_size: int = 512,
        num_proc: int = 1,
        add_special_tokens: bool = True,
        append_eod: bool = False,
    ) -> "InMemoryCorpus":
        stats = stats if stats is not None else DataStats()

        def plain():
            for t in texts:
                if isinstance(t, Document):  # a reader counted it already
                    yield t.text
                else:
                    stats.documents_read += 1
                    yield t

        docs = list(tokenize_stream(plain(), tokenizer, batch_size=batch_size, num_proc=num_proc, add_special_tokens=add_special_tokens, append_eod=append_eod))
        stats.tokens_in += int(sum(d.shape[0] for d in docs))
        return cls.from_token_arrays(docs, stats)

    def get(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        a = int(self.offsets[i]) + start
        return self.tokens[a : a + length]  # a view: no copy of a huge document per chunk

    def first_tokens(self) -> np.ndarray:
        first = np.full(len(self), -1, dtype=np.int64)
        nz = self.lengths > 0
        first[nz] = self.tokens[self.offsets[:-1][nz]]
        return first


class IndexedCorpus(_CorpusBase):
    """A Megatron ``.bin/.idx`` pair, memory-mapped (data/indexed.py: the format megatron-core's
    ``IndexedDataset`` reads, without importing megatron-core).

    A document is the concatenation of its sequences (``document_indices``); files written
    without sentence splitting hold one sequence per document.
    """

    def __init__(self, path_prefix: str | os.PathLike):
        try:
            self.file = IndexedFile(path_prefix)
        except ValueError as e:
            raise DataError(str(e)) from e
        self.path_prefix = self.file.path_prefix
        seq_lengths = self.file.sequence_lengths.astype(np.int64)
        self.doc_index = np.asarray(self.file.document_indices, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_lengths)])
        self.lengths = cum[self.doc_index[1:]] - cum[self.doc_index[:-1]]
        self._single = bool(np.all(np.diff(self.doc_index) == 1))
        self.stats = DataStats(documents_read=int((self.lengths > 0).sum()), tokens_in=int(self.lengths.sum()))
        if (self.lengths == 0).any():  # possible in files from other tools; they yield no piece
            self.stats.skip("empty", int((self.lengths == 0).sum()))

    def _sequences(self, i: int) -> range:
        return range(int(self.doc_index[i]), int(self.doc_index[i + 1]))

    def get(self, i: int) -> np.ndarray:
        parts = [self.file.sequence(s) for s in self._sequences(i)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        if self._single:  # a view of the chunk in the mmap, not the whole document
            return self.file.sequence(int(self.doc_index[i]))[start : start + length]
        return self.get(i)[start : start + length]

    def first_tokens(self) -> np.ndarray:
        first = np.full(len(self), -1, dtype=np.int64)
        for i in np.flatnonzero(self.lengths > 0):
            for s in self._sequences(int(i)):
                if self.file.sequence_lengths[s] > 0:
                    first[i] = int(self.file.sequence(s)[0])
                    break
        return first

    def __getstate__(self):
        return self.path_prefix

    def __setstate__(self, path_prefix):
        self.__init__(path_prefix)


def open_corpus(
    source,
    tokenizer=None,
    *,
    text_field: str = "text",
    txt_unit: str = "document",
    on_bad: str = "error",
    max_chars: int | None = None,
    num_proc: int = 1,
    add_special_tokens: bool = True,
    append_eod: bool = False,
    hf_split: str = "train",
):
    """One entry point for every input kind; returns a corpus with ``.stats``.

    ``source``: a Megatron path prefix (``prefix.bin``/``prefix.idx`` exist) -> IndexedCorpus;
    a local path / directory / glob / list -> files read and tokenised into memory;
    ``hf:<name>`` -> a hub dataset (internet needed); a ``datasets`` object -> read from it.
    """
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("hf:"):
        s = str(source)
        prefix = s[:-4] if s.endswith((".bin", ".idx")) else s
        if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
            return IndexedCorpus(prefix)
    if tokenizer is None:
        raise ValueError(f"{source!r} is text input: a tokenizer is needed")
    stats = DataStats()
    docs = read_source(source, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats, hf_split=hf_split)
    corpus = InMemoryCorpus.from_texts(docs, tokenizer, stats=stats, num_proc=num_proc, add_special_tokens=add_special_tokens, append_eod=append_eod)
    if len(corpus) == 0:
        raise DataError(f"{source}: no usable documents ({stats.report('read')})")
    return corpus


class NegativeTexts:
    """Hard negatives of the pairs: record i owns texts ``offsets[i]:offsets[i + 1]`` of
    ``corpus`` (zero or more each)."""

    def __init__(self, corpus: InMemoryCorpus, offsets: np.ndarray):
        self.corpus, self.offsets = corpus, np.asarray(offsets, dtype=np.int64)
        self.counts = np.diff(self.offsets)

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def get(self, i: int) -> list[np.ndarray]:
        return [self.corpus.get(j) for j in range(int(self.offsets[i]), int(self.offsets[i + 1]))]

    def head(self, n: int) -> "NegativeTexts":
        """The negatives of records 0..n-1 (a split's train part, which is the first range)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"head({n}) of the negatives of {len(self)} records")
        return NegativeTexts(self.corpus, self.offsets[: n + 1])

    @property
    def max_per_record(self) -> int:
        return int(self.counts.max()) if len(self) else 0

    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.counts).tobytes()).hexdigest()[:12]
        return f"{self.corpus.fingerprint()}-per-record-{h}"


@dataclass
class PairCorpus:
    """Aligned (query, positive) texts for supervised contrastive training: pair i is
    ``queries.get(i)`` and ``positives.get(i)``, its hard negatives ``negatives.get(i)`` (when
    read); ``stats`` counts pairs read and skipped, and the hard negatives."""

    queries: InMemoryCorpus
    positives: InMemoryCorpus
    negatives: NegativeTexts | None = None
    texts: RawTexts | None = None  # data.texts.RawTexts of the pairs as read (open_pair_corpus(keep_texts=True)), for a teacher

    @property
    def stats(self) -> DataStats:
        return self.queries.stats

    def __len__(self) -> int:
        return len(self.queries)


def open_pair_corpus(
    source,
    tokenizer,
    *,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str | None = None,
    negatives_required: bool = False,
    on_bad: str = "error",
    max_chars: int | None = None,
    num_proc: int = 1,
    hf_split: str = "train",
    query_prompt: str = "",
    keep_texts: bool = False,
) -> PairCorpus:
    """Read (query, positive) pairs from json/jsonl/parquet files or a HF dataset (``hf:NAME``).
    ``query_prompt`` is prepended to every query before tokenisation (as inference prepends it).

    Every record must hold both fields as non-empty strings; a bad record raises
    :class:`DataError` naming its file and line, or with ``on_bad="skip"`` is skipped and
    counted (a pair is never half-kept, so the two sides stay aligned). ``negative_field``:
    also read that field's hard negatives (a string or a list of strings, see
    :class:`~megatron_gem.data.readers.TextList`); records without it are kept and counted
    unless ``negatives_required``. ``keep_texts``: the pairs' strings as read (queries without
    the prompt) also travel, as ``texts`` (a :class:`~megatron_gem.data.texts.RawTexts`), for a
    distillation teacher.
    """
    names = [query_field, positive_field] + ([negative_field] if negative_field else [])
    if len(set(names)) != len(names):
        raise ValueError(f"query, positive and negative fields must differ, got {names}")
    fields = (query_field, positive_field)
    if isinstance(source, (str, os.PathLike, list, tuple)) and not str(source).startswith("hf:"):
        for path in resolve_paths(source):
            if _suffix(path) not in JSON_SUFFIXES + PARQUET_SUFFIXES:
                raise DataError(f"{path}: pairs need records with fields {fields} (json, jsonl or parquet), not {_suffix(path)!r}")
    if negative_field:
        fields = fields + (TextList(negative_field, negatives_required),)
    stats = DataStats()
    pairs = read_source(source, text_field=fields, txt_unit="document", on_bad=on_bad, max_chars=max_chars, stats=stats, hf_split=hf_split)
    texts = [d.text for d in pairs]
    if not texts:
        raise DataError(f"{source}: no usable pairs ({stats.report('read')})")
    query_texts = [query_prompt + t[0] for t in texts]
    positive_texts = [t[1] for t in texts]
    queries, positives = (InMemoryCorpus.from_texts(side, tokenizer, stats=DataStats(), num_proc=num_proc) for side in (query_texts, positive_texts))
    stats.tokens_in = queries.stats.tokens_in + positives.stats.tokens_in
    negatives = None
    if negative_field:
        flat = [n for t in texts for n in t[2]]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(t[2]) for t in texts], out=offsets[1:])
        negatives = NegativeTexts(InMemoryCorpus.from_texts(flat, tokenizer, stats=DataStats(), num_proc=num_proc), offsets)
        stats.hard_negatives = len(flat)
        stats.tokens_in += negatives.corpus.stats.tokens_in
    queries.stats = stats  # what reading the pairs counted travels with the anchors (ContrastiveDataset.epoch_stats)
    raw = None
    if keep_texts:
        from .texts import RawTexts

        raw = RawTexts([t[0] for t in texts], positive_texts, [list(t[2]) for t in texts] if negative_field else None)
    return PairCorpus(queries, positives, negatives, raw)
