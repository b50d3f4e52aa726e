"""Where documents come from: text files, HF datasets, Megatron indexed datasets.

Two layers:
  records -> text    ``iter_documents`` (local jsonl / json / txt / parquet files) and
                     ``iter_hf_documents`` (a hub dataset name or a ``datasets`` object), both
                     streaming and both validating every record: a structural problem raises
                     :class:`DataError` naming the file and line, unless ``on_bad="skip"``, in
                     which case the record is counted by reason in :class:`DataStats`.
  text -> tokens     a *corpus*: random access to tokenised documents by index.
                     :class:`InMemoryCorpus` tokenises texts into one flat array;
                     :class:`IndexedCorpus` reads Megatron ``.bin/.idx`` files with
                     megatron-core's own ``IndexedDataset``.
Both corpora expose ``lengths`` (int64 [num_docs]) and ``get(i)`` (int64 tokens), so the
packing code above them is the same for every input kind.

Empty or whitespace-only documents are always skipped and counted (reason ``empty``): they
are valid input with nothing to train on. Documents are numbered by their position among the
accepted documents, which is what the seeded per-document randomness keys on.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .stats import DataStats

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
TXT_UNITS = ("document", "paragraph", "line")
ON_BAD = ("error", "skip")


class DataError(ValueError):
    """A structural problem in the input: names the file and the line (or record)."""


@dataclass(frozen=True)
class Document:
    text: str | tuple[str, ...]  # a tuple when several fields were read (pairs)
    where: str  # "path:line" (or "path:row N" / "dataset:record N") of the record


def _suffix(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(p)[1].lower()


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand files, directories (recursively, known suffixes, sorted) and glob patterns.

    A path that matches nothing raises FileNotFoundError naming it (also with on_bad="skip":
    a missing input is a configuration error, not a bad record).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = sorted(
                os.path.join(d, f) for d, _, files in os.walk(p) for f in files if _suffix(f) in KNOWN_SUFFIXES
            )
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no {'/'.join(KNOWN_SUFFIXES)} files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        elif glob.has_magic(p):
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise FileNotFoundError(f"{p}: pattern matches no file")
            out += found
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class _Validator:
    """Applies the bad-record policy and counts what it skips."""

    def __init__(self, on_bad: str, stats: DataStats, max_chars: int | None):
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad={on_bad!r}: expected one of {ON_BAD}")
        self.on_bad, self.stats, self.max_chars = on_bad, stats, max_chars

    def bad(self, reason: str, where: str, message: str) -> None:
        if self.on_bad == "skip":
            self.stats.skip(reason)
            return
        raise DataError(f"{where}: {message} (pass on_bad='skip' / --skip-bad-records to skip and count such records)")

    def _usable(self, value, where: str, what: str) -> bool:
        """Whether one text value can be trained on; counts (or raises for) what cannot."""
        if not isinstance(value, str):
            self.bad("not_a_string", where, f"{what} is {type(value).__name__}, not a string")
            return False
        if not value.strip():
            self.stats.skip("empty")
            return False
        if self.max_chars is not None and len(value) > self.max_chars:
            self.bad("too_long", where, f"{what} has {len(value)} characters > max_chars={self.max_chars}")
            return False
        return True

    def text(self, value, where: str) -> Document | None:
        if not self._usable(value, where, "text"):
            return None
        self.stats.documents_read += 1
        return Document(value, where)

    def field(self, record, text_field: str | tuple[str, ...], where: str) -> Document | None:
        """The record's text; with a tuple of field names (pairs), a Document whose ``text`` is
        the tuple of their texts, and the whole record skipped if any field is bad or empty."""
        if not isinstance(record, dict):
            self.bad("not_an_object", where, f"record is a JSON {type(record).__name__}, expected an object")
            return None
        names = text_field if isinstance(text_field, tuple) else (text_field,)
        for name in names:
            if name not in record:
                keys = ", ".join(sorted(map(str, record))[:8]) or "none"
                self.bad("missing_field", where, f"no field {name!r} (fields: {keys})")
                return None
        if not isinstance(text_field, tuple):
            return self.text(record[text_field], where)
        if not all(self._usable(record[name], where, f"field {name!r}") for name in names):
            return None
        self.stats.documents_read += 1
        return Document(tuple(record[name] for name in names), where)


def _decode_lines(path: str, check: _Validator) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without the newline); bad UTF-8 names its line."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                check.bad("invalid_utf8", f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start} of the line")


def _iter_jsonl(path: str, text_field: str | tuple[str, ...], check: _Validator) -> Iterator[Document]:
    for lineno, line in _decode_lines(path, check):
        if not line.strip():
            continue  # blank separator lines are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            check.bad("malformed_json", f"{path}:{lineno}", f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        doc = check.field(record, text_field, f"{path}:{lineno}")
        if doc is not None:
            yield doc


def _iter_json_array(path: str, text_field: str | tuple[str, ...], check: _Validator) -> Iterator[Document]:
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        # A JSON array is one structure: a bad byte spoils the whole file, so this always raises.
        raise DataError(f"{path}:{line}: invalid UTF-8 in a JSON array file") from e
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}:1: expected a JSON array of records or JSON lines")
    for i, record in enumerate(records):
        doc = check.field(record, text_field, f"{path}: record {i}")
        if doc is not None:
            yield doc


def _first_byte(path: str) -> bytes:
    with _open_binary(path) as f:
        while True:
            b = f.read(1)
            if not b or not b.isspace():
                return b


def _iter_txt(path: str, unit: str, check: _Validator) -> Iterator[Document]:
    if unit == "line":
        for lineno, line in _decode_lines(path, check):
            doc = check.text(line, f"{path}:{lineno}") if line.strip() else None
            if doc is not None:
                yield doc
        return
    if unit == "document":
        # A bad line raises, or (on_bad="skip") is left out of the document and counted.
        buf = [line for _, line in _decode_lines(path, check)]
        doc = check.text("\n".join(buf), f"{path}:1")
        if doc is not None:
            yield doc
        return
    # paragraph: blank-line separated blocks, each named by its first line
    buf, start = [], 0
    for lineno, line in _decode_lines(path, check):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            doc = check.text("\n".join(buf), f"{path}:{start}")
            buf = []
            if doc is not None:
                yield doc
    if buf:
        doc = check.text("\n".join(buf), f"{path}:{start}")
        if doc is not None:
            yield doc


def _iter_parquet(path: str, text_field: str | tuple[str, ...], check: _Validator) -> Iterator[Document]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
    for i, record in enumerate(ds):
        doc = check.field(record, text_field, f"{path}: row {i}")
        if doc is not None:
            yield doc


def iter_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str | tuple[str, ...] = "text",
    txt_unit: str = "document",
    on_bad: str = "error",
    max_chars: int | None = None,
    stats: DataStats | None = None,
) -> Iterator[Document]:
    """Stream validated documents from local files, in path order then file order.

    Formats by suffix (optionally ``.gz``): ``.jsonl/.ndjson`` JSON lines; ``.json`` JSON lines
    or one JSON array of records; ``.txt/.text/.md/.rst`` plain text with ``txt_unit`` one of
    ``document`` (a file is one document), ``paragraph`` (blank-line separated) or ``line``;
    ``.parquet`` through HF ``datasets`` (streaming). ``text_field`` names the field holding the
    text in json/parquet records (a tuple of names reads several fields: see
    :func:`open_pair_corpus`). Counts go to ``stats``.
    """
    if txt_unit not in TXT_UNITS:
        raise ValueError(f"txt_unit={txt_unit!r}: expected one of {TXT_UNITS}")
    stats = stats if stats is not None else DataStats()
    check = _Validator(on_bad, stats, max_chars)
    for path in resolve_paths(paths):
        suffix = _suffix(path)
        if os.path.getsize(path) == 0:
            check.bad("empty_file", f"{path}:0", "empty file, no documents")
            continue
        before = stats.documents_read + stats.documents_skipped
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(path, text_field, check)
        elif suffix == ".json":
            if _first_byte(path) == b"[":
                yield from _iter_json_array(path, text_field, check)
            else:
                yield from _iter_jsonl(path, text_field, check)
        elif suffix in TEXT_SUFFIXES:
            yield from _iter_txt(path, txt_unit, check)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(path, text_field, check)
        else:
            raise DataError(f"{path}: unknown file kind {suffix!r}; expected one of {KNOWN_SUFFIXES}")
        if stats.documents_read + stats.documents_skipped == before:
            # Only whitespace (or blank lines): nothing at all came out of this file.
            check.bad("empty_file", f"{path}:0", "file holds no records")


def iter_hf_documents(
    dataset,
    *,
    text_field: str | tuple[str, ...] = "text",
    split: str = "train",
    name: str | None = None,
    streaming: bool = True,
    on_bad: str = "error",
    max_chars: int | None = None,
    stats: DataStats | None = None,
    **load_kwargs,
) -> Iterator[Document]:
    """Stream validated documents from a HF dataset.

    ``dataset`` is a hub name (loaded with ``datasets.load_dataset(dataset, name, split=split,
    streaming=streaming)``; needs internet unless cached) or an already built
    ``datasets.Dataset`` / ``IterableDataset``. Records are named ``<dataset>:record <i>``.
    """
    stats = stats if stats is not None else DataStats()
    check = _Validator(on_bad, stats, max_chars)
    if isinstance(dataset, str):
        import datasets

        label = dataset
        dataset = datasets.load_dataset(dataset, name, split=split, streaming=streaming, **load_kwargs)
    else:
        label = getattr(dataset, "info", None) and dataset.info.dataset_name or type(dataset).__name__
    for i, record in enumerate(dataset):
        doc = check.field(record, text_field, f"{label}:record {i}")
        if doc is not None:
            yield doc


# ----------------------------------------------------------------------------- tokenising


def eod_token_id(tokenizer) -> int:
    eod = tokenizer.eos_token_id
    if eod is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; cannot append an end-of-document token")
    return int(eod)


def tokenize_texts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True, append_eod: bool = False) -> list[np.ndarray]:
    """Tokenise a batch of texts (one fast-tokenizer call). Returns int64 arrays.

    ``add_special_tokens`` lets the tokenizer add what it adds by default (e.g. Llama's BOS);
    ``append_eod`` appends ``tokenizer.eos_token_id`` to every document (Megatron's --append-eod).
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)["input_ids"]
    out = [np.asarray(x, dtype=np.int64) for x in ids]
    if append_eod:
        eod = np.array([eod_token_id(tokenizer)], dtype=np.int64)
        out = [np.concatenate([x, eod]) for x in out]
    return out


_WORKER_TOKENIZER = None
_WORKER_KW: dict = {}


def _worker_init(tokenizer, kw) -> None:
    global _WORKER_TOKENIZER, _WORKER_KW
    _WORKER_TOKENIZER, _WORKER_KW = tokenizer, kw


def _worker_tokenize(texts: list[str]) -> list[np.ndarray]:
    return tokenize_texts(_WORKER_TOKENIZER, texts, **_WORKER_KW)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_stream(
    texts: Iterable[str],
    tokenizer,
    *,
    batch_size: int = 512,
    num_proc: int = 1,
    add_special_tokens: bool = True,
    append_eod: bool = False,
) -> Iterator[np.ndarray]:
    """Tokenise a stream of texts in order, in batches, optionally in ``num_proc`` processes.

    Reading stays in the calling process (so errors name their line in order); workers only
    tokenise. Output order equals input order whatever ``num_proc`` is.
    """
    kw = dict(add_special_tokens=add_special_tokens, append_eod=append_eod)
    if num_proc <= 1:
        for batch in _batches(texts, batch_size):
            yield from tokenize_texts(tokenizer, batch, **kw)
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(num_proc, initializer=_worker_init, initargs=(tokenizer, kw)) as pool:
        for out in pool.imap(_worker_tokenize, _batches(texts, batch_size), chunksize=1):
            yield from out


# ----------------------------------------------------------------------------- corpora


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

        docs = list(
            tokenize_stream(
                plain(), tokenizer, batch_size=batch_size, num_proc=num_proc, add_special_tokens=add_special_tokens, append_eod=append_eod
            )
        )
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


def _import_indexed_dataset():
    # megatron.core's package import warns about missing TransformerEngine/apex on CPU; those
    # warnings concern training kernels, not this file reader.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class IndexedCorpus(_CorpusBase):
    """A Megatron ``.bin/.idx`` pair read with megatron-core's ``IndexedDataset`` (mmap).

    A document is the concatenation of its sequences (``document_indices``); files written
    without sentence splitting hold one sequence per document.
    """

    def __init__(self, path_prefix: str | os.PathLike):
        path_prefix = str(path_prefix)
        for suffix in (".bin", ".idx"):
            if path_prefix.endswith(suffix):
                path_prefix = path_prefix[: -len(suffix)]
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(path_prefix + suffix):
                raise FileNotFoundError(f"{path_prefix}{suffix}: no such file (expected a Megatron .bin/.idx pair)")
        self.path_prefix = path_prefix
        self.dataset = _import_indexed_dataset().IndexedDataset(path_prefix)
        seq_lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.doc_index = np.asarray(self.dataset.document_indices, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_lengths)])
        self.lengths = cum[self.doc_index[1:]] - cum[self.doc_index[:-1]]
        self._single = bool(np.all(np.diff(self.doc_index) == 1))
        self.stats = DataStats(documents_read=int((self.lengths > 0).sum()), tokens_in=int(self.lengths.sum()))
        if (self.lengths == 0).any():  # possible in files from other tools; they yield no piece
            self.stats.skip("empty", int((self.lengths == 0).sum()))

    def get(self, i: int) -> np.ndarray:
        if self._single:
            return np.asarray(self.dataset[int(i)], dtype=np.int64)
        s, e = int(self.doc_index[i]), int(self.doc_index[i + 1])
        if e == s:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self.dataset[s:e]).astype(np.int64)

    def get_slice(self, i: int, start: int, length: int) -> np.ndarray:
        if self._single:  # read only the chunk from the mmap, not the whole document
            return self.dataset.get(int(i), offset=int(start), length=int(length))
        return self.get(i)[start : start + length]

    def first_tokens(self) -> np.ndarray:
        first = np.full(len(self), -1, dtype=np.int64)
        for i in np.flatnonzero(self.lengths > 0):
            s = int(self.doc_index[i])
            while self.dataset.sequence_lengths[s] == 0:
                s += 1
            first[i] = int(self.dataset.get(s, 0, 1)[0])
        return first

    def __getstate__(self):
        return self.path_prefix

    def __setstate__(self, path_prefix):
        self.__init__(path_prefix)


def optimal_token_dtype(vocab_size: int):
    """The dtype megatron-core picks for a vocabulary (uint16 below 65500, else int32)."""
    return _import_indexed_dataset().DType.optimal_dtype(vocab_size)


class IndexedWriter:
    """Writes documents as a Megatron ``.bin/.idx`` pair via megatron-core's IndexedDatasetBuilder."""

    def __init__(self, path_prefix: str | os.PathLike, vocab_size: int):
        self.path_prefix = str(path_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        idx = _import_indexed_dataset()
        self.dtype = idx.DType.optimal_dtype(vocab_size)
        self._builder = idx.IndexedDatasetBuilder(idx.get_bin_path(self.path_prefix), dtype=self.dtype)
        self._idx_path = idx.get_idx_path(self.path_prefix)
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}")
        # add_document only needs an array (it calls numpy.array on it); a numpy array avoids a
        # torch __array__ deprecation warning.
        self._builder.add_document(tokens.astype(self.dtype), [int(tokens.shape[0])])
        self.documents += 1
        self.tokens += int(tokens.shape[0])

    def close(self) -> str:
        self._builder.finalize(self._idx_path)
        return self.path_prefix

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._builder.data_file.close()


def _read_source(source, *, text_field, txt_unit, on_bad, max_chars, stats, hf_split) -> Iterator[Document]:
    """Validated documents of text input: ``hf:<name>``, local files, or a ``datasets`` object."""
    if isinstance(source, str) and source.startswith("hf:"):
        return iter_hf_documents(source[3:], text_field=text_field, split=hf_split, on_bad=on_bad, max_chars=max_chars, stats=stats)
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return iter_documents(source, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats)
    return iter_hf_documents(source, text_field=text_field, on_bad=on_bad, max_chars=max_chars, stats=stats)


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
    docs = _read_source(source, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats, hf_split=hf_split)
    corpus = InMemoryCorpus.from_texts(
        docs, tokenizer, stats=stats, num_proc=num_proc, add_special_tokens=add_special_tokens, append_eod=append_eod
    )
    if len(corpus) == 0:
        raise DataError(f"{source}: no usable documents ({stats.summary('read')})")
    return corpus


@dataclass
class PairCorpus:
    """Aligned (query, positive) texts for supervised contrastive training: pair i is
    ``queries.get(i)`` and ``positives.get(i)``; ``stats`` counts pairs read and skipped."""

    queries: InMemoryCorpus
    positives: InMemoryCorpus

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
    on_bad: str = "error",
    max_chars: int | None = None,
    num_proc: int = 1,
    hf_split: str = "train",
) -> PairCorpus:
    """Read (query, positive) pairs from json/jsonl/parquet files or a HF dataset (``hf:NAME``).

    Every record must hold both fields as non-empty strings; a bad record raises
    :class:`DataError` naming its file and line, or with ``on_bad="skip"`` is skipped and
    counted (a pair is never half-kept, so the two sides stay aligned).
    """
    if query_field == positive_field:
        raise ValueError(f"query and positive field are both {query_field!r}")
    fields = (query_field, positive_field)
    if isinstance(source, (str, os.PathLike, list, tuple)) and not str(source).startswith("hf:"):
        for path in resolve_paths(source):
            if _suffix(path) not in JSON_SUFFIXES + PARQUET_SUFFIXES:
                raise DataError(f"{path}: pairs need records with fields {fields} (json, jsonl or parquet), not {_suffix(path)!r}")
    stats = DataStats()
    pairs = _read_source(source, text_field=fields, txt_unit="document", on_bad=on_bad, max_chars=max_chars, stats=stats, hf_split=hf_split)
    texts = [d.text for d in pairs]
    if not texts:
        raise DataError(f"{source}: no usable pairs ({stats.summary('read')})")
    queries, positives = (InMemoryCorpus.from_texts(list(side), tokenizer, stats=DataStats(), num_proc=num_proc) for side in zip(*texts))
    stats.tokens_in = queries.stats.tokens_in + positives.stats.tokens_in
    queries.stats = stats  # what reading the pairs counted travels with the anchors (ContrastiveDataset.epoch_stats)
    return PairCorpus(queries, positives)
