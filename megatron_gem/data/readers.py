"""Where documents come from: records -> text.

``iter_documents`` (local jsonl / json / txt / parquet files) and ``iter_hf_documents`` (a hub
dataset name or a ``datasets`` object), both streaming and both validating every record: a
structural problem raises :class:`DataError` naming the file and line, unless
``on_bad="skip"``, in which case the record is counted by reason in :class:`DataStats`.

Empty or whitespace-only documents are always skipped and counted (reason ``empty``): they
are valid input with nothing to train on. Documents are numbered by their position among the
accepted documents, which is what the seeded per-document randomness keys on.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..common.errors import InputError
from .stats import DataStats

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
TXT_UNITS = ("document", "paragraph", "line")
ON_BAD = ("error", "skip")


class DataError(InputError):
    """A structural problem in the input: names the file and the line (or record)."""


def json_error(e: json.JSONDecodeError) -> str:
    """'malformed JSON (Expecting value at column 7)': json's own wording ends some messages
    with "at" ("Unterminated string starting at"), which the column completes once."""
    msg = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
    return f"malformed JSON ({msg} at column {e.colno})"


@dataclass(frozen=True)
class Document:
    text: str | tuple  # a tuple when several fields were read (pairs; a TextList field gives a tuple of texts)
    where: str  # "path:line" (or "path:row N" / "dataset:record N") of the record


@dataclass(frozen=True)
class TextList:
    """A record field holding zero or more texts: a string or a list of strings (hard
    negatives). A record without it (missing, null or []) is kept and counted
    (``DataStats.records_without_negatives``) unless ``required``, when it is a bad record.
    Empty strings in it are dropped and counted (``DataStats.empty_negatives``)."""

    name: str
    required: bool = False


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
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files if _suffix(f) in KNOWN_SUFFIXES)
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
        elif os.path.lexists(p):
            raise FileNotFoundError(f"{p}: a symbolic link to nowhere (or a link loop)")
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
        raise DataError(f"{where}: {message} (--skip-bad-records skips and counts such records)")

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

    def text_list(self, record: dict, spec: TextList, where: str):
        """The texts of a TextList field as a tuple (possibly empty); None: the record is bad."""
        value = record.get(spec.name)
        if isinstance(value, str):
            value = [value]
        if value is None or (isinstance(value, list) and not value):
            if spec.required:
                keys = ", ".join(sorted(map(str, record))[:8]) or "none"
                self.bad("missing_negatives", where, f"no {spec.name!r} texts (fields: {keys}; the field is required)")
                return None
            self.stats.records_without_negatives += 1
            return ()
        if not isinstance(value, list):
            self.bad("not_a_string", where, f"field {spec.name!r} is {type(value).__name__}, not a string or a list of strings")
            return None
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.bad("not_a_string", where, f"field {spec.name!r} item {i} is {type(item).__name__}, not a string")
                return None
            if self.max_chars is not None and len(item) > self.max_chars:
                self.bad("too_long", where, f"field {spec.name!r} item {i} has {len(item)} characters > max_chars={self.max_chars}")
                return None
        texts = tuple(t for t in value if t.strip())
        self.stats.empty_negatives += len(value) - len(texts)
        if not texts and spec.required:
            self.bad("missing_negatives", where, f"field {spec.name!r} holds only empty texts (the field is required)")
            return None
        if not texts:
            self.stats.records_without_negatives += 1
        return texts

    def field(self, record, text_field: str | tuple, where: str) -> Document | None:
        """The record's text; with a tuple of field names (pairs), a Document whose ``text`` is
        the tuple of their texts, and the whole record skipped if any field is bad or empty.
        A :class:`TextList` entry of the tuple gives a tuple of texts (see there)."""
        if not isinstance(record, dict):
            self.bad("not_an_object", where, f"record is a JSON {type(record).__name__}, expected an object")
            return None
        names = text_field if isinstance(text_field, tuple) else (text_field,)
        for name in names:
            if not isinstance(name, TextList) and name not in record:
                keys = ", ".join(sorted(map(str, record))[:8]) or "none"
                self.bad("missing_field", where, f"no field {name!r} (fields: {keys})")
                return None
        if not isinstance(text_field, tuple):
            return self.text(record[text_field], where)
        if not all(self._usable(record[name], where, f"field {name!r}") for name in names if not isinstance(name, TextList)):
            return None
        texts = []
        for name in names:
            if isinstance(name, TextList):
                value = self.text_list(record, name, where)
                if value is None:
                    return None
                texts.append(value)
            else:
                texts.append(record[name])
        self.stats.documents_read += 1
        return Document(tuple(texts), where)


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
            check.bad("malformed_json", f"{path}:{lineno}", json_error(e))
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
        raise DataError(f"{path}:{e.lineno}: {json_error(e)}") from e
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


def read_source(source, *, text_field, txt_unit, on_bad, max_chars, stats, hf_split) -> Iterator[Document]:
    """Validated documents of text input (the one dispatch open_corpus, open_pair_corpus and
    texts.read_texts share, so each reads a source alike): ``hf:<name>``, local files, or a ``datasets`` object."""
    if isinstance(source, str) and source.startswith("hf:"):
        return iter_hf_documents(source[3:], text_field=text_field, split=hf_split, on_bad=on_bad, max_chars=max_chars, stats=stats)
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return iter_documents(source, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats)
    return iter_hf_documents(source, text_field=text_field, on_bad=on_bad, max_chars=max_chars, stats=stats)
