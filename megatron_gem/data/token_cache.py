"""Text input tokenised once: a Megatron ``.bin/.idx`` cache keyed by what decides its tokens.

Text files (jsonl/json/parquet/txt) are otherwise read and tokenised in full by every process
that opens them, and held in its memory (``InMemoryCorpus``). ``build_or_reuse`` tokenises them
once into ``CACHE_DIR/<name>-<key>/`` (``preprocess_to_indexed``: one sequence per document,
so :class:`~megatron_gem.data.corpus.IndexedCorpus` on it yields exactly the documents
``InMemoryCorpus`` builds from the same files) and ``open_cached`` memory-maps it.

The key (sha256) covers everything that changes the token ids or which documents there are:
the content of every input file in order (sha256 of its bytes, its size and the suffix that
decides how it is read), the reading options (text field, txt unit, bad-record policy,
max_chars), the tokenizer (its full serialised pipeline: vocabulary, merges, normalizer,
pre-tokenizer, post-processor, added tokens; or, for a slow tokenizer, its vocabulary and
special tokens; its class, its length and the ids it gives a probe text) and the tokenisation
options (special tokens, end-of-document token). File names and locations are not in it: a
copy of the corpus elsewhere reuses the cache.

Atomic: a cache is built in ``<dir>.tmp.<id>`` (data fsynced, ``cache.json`` written last) and
renamed into place; only a directory whose ``cache.json`` names the same key and whose files
have the recorded sizes is reused. A killed build leaves only a ``.tmp.`` directory, which is
never read (delete it at leisure). Two jobs building the same cache at once each build their
own; the first rename wins and the other is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass

from ..common.manifest import sha256_of
from .readers import _suffix, resolve_paths
from .stats import DataStats

CACHE_VERSION = 1
CACHE_INFO = "cache.json"
# Tokenised with every tokenizer to catch settings that live outside its serialised pipeline
# (a BOS/EOS flag of the Python wrapper, say).
_PROBE = "GEM cache probe: Hello, world! 12345\n\tüñí 中文 <|end|>"


def cacheable(source) -> bool:
    """True for local text input (files, directories, globs; one or a list). Not for a Megatron
    prefix (already indexed and memory-mapped), ``hf:NAME`` or a ``datasets`` object."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(sources, (list, tuple)) or not sources:
        return False
    for s in map(str, sources):
        prefix = s[:-4] if s.endswith((".bin", ".idx")) else s
        if s.startswith("hf:") or (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            return False
    return True


def tokenizer_identity(tokenizer) -> dict:
    """What decides the ids this tokenizer gives a text (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = backend.to_str()
    else:
        pipeline = json.dumps({"vocab": tokenizer.get_vocab(), "special": tokenizer.special_tokens_map}, sort_keys=True, default=str)
    return {
        "class": type(tokenizer).__name__,
        "pipeline_sha256": hashlib.sha256(pipeline.encode()).hexdigest(),
        "length": len(tokenizer),
        "probe": [int(i) for i in tokenizer(_PROBE, add_special_tokens=True)["input_ids"]],
    }


def cache_key(source, tokenizer, *, text_field="text", txt_unit="document", on_bad="error", max_chars=None, add_special_tokens=True, append_eod=False):
    """(hex key, the description it hashes). Reads every input file once (sha256)."""
    files = [{"sha256": sha256_of(p), "size": os.path.getsize(p), "suffix": _suffix(p), "gz": p.endswith(".gz")} for p in resolve_paths(source)]
    description = {
        "version": CACHE_VERSION,
        "files": files,
        "reading": {"text_field": text_field, "txt_unit": txt_unit, "on_bad": on_bad, "max_chars": max_chars},
        "tokenizer": tokenizer_identity(tokenizer),
        "tokenisation": {"add_special_tokens": add_special_tokens, "append_eod": append_eod},
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return key, description


@dataclass
class CacheEntry:
    """A cache ready to open: ``prefix`` of its .bin/.idx, ``status`` "built" or "reused",
    the DataStats of reading the text (as a dict) and the documents/tokens it holds."""

    directory: str
    prefix: str
    status: str
    stats: dict
    documents: int
    tokens: int

    def note(self, source) -> str:
        return f"[data cache] {self.status} {self.directory} ({self.documents} documents, {self.tokens} tokens of {source})"


def _name(source) -> str:
    first = str(source[0] if isinstance(source, (list, tuple)) else source).rstrip("/")
    stem = os.path.basename(first) or "data"
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".txt", ".text", ".md", ".rst"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40] or "data"


def _read_entry(directory: str, key: str, status: str) -> CacheEntry | None:
    """The cache in ``directory`` if it is complete and made for ``key``, else None."""
    try:
        with open(os.path.join(directory, CACHE_INFO)) as f:
            info = json.load(f)
        if info.get("key") != key:
            return None
        prefix = os.path.join(directory, info["prefix"])
        for suffix, size in info["sizes"].items():
            if os.path.getsize(prefix + suffix) != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CacheEntry(directory, prefix, status, info["stats"], info["documents"], info["tokens"])


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_or_reuse(source, tokenizer, cache_dir: str, *, log=None, **options) -> CacheEntry:
    """The cache of ``source`` (text input) under ``cache_dir``: reused when a complete one
    with the same key is there, else tokenised now and renamed into place. ``options``:
    text_field, txt_unit, on_bad, max_chars, add_special_tokens, append_eod (cache_key's).
    ``log(line)`` is told before a build starts. Raises what reading the input raises
    (DataError naming the file and line), leaving no cache behind."""
    from .preprocess import preprocess_to_indexed

    key, description = cache_key(source, tokenizer, **options)
    final = os.path.join(cache_dir, f"{_name(source)}-{key[:16]}")
    entry = _read_entry(final, key, "reused")
    if entry is not None:
        return entry
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{final}.tmp.{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    if log is not None:
        log(f"[data cache] tokenising {source} once into {final}")
    try:
        read = {k: options[k] for k in ("text_field", "txt_unit", "on_bad", "max_chars") if k in options}
        tok = {k: options[k] for k in ("add_special_tokens", "append_eod") if k in options}
        prefix, stats = preprocess_to_indexed(source, tokenizer, os.path.join(tmp, "tokens"), progress=False, **read, **tok)
        sizes = {suffix: os.path.getsize(prefix + suffix) for suffix in (".bin", ".idx")}
        for suffix in sizes:
            _fsync(prefix + suffix)
        info = {
            "key": key,
            "description": description,
            "prefix": os.path.basename(prefix),
            "sizes": sizes,
            "stats": stats.to_dict(),
            "documents": stats.documents_read,
            "tokens": stats.tokens_in,
        }
        with open(os.path.join(tmp, CACHE_INFO), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, final)  # atomic; fails when another builder's (or a stale) directory is there
        except OSError:
            won = _read_entry(final, key, "reused")
            if won is not None:  # another job built the same cache meanwhile: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return won
            # A stale cache of this name (a build cut short, a version of ours that no longer
            # verifies): the name is this cache's content key, so the directory is one we wrote.
            stale = f"{final}.stale.{uuid.uuid4().hex[:12]}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        _fsync(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheEntry(final, os.path.join(final, info["prefix"]), "built", info["stats"], info["documents"], info["tokens"])


def open_cached(entry: CacheEntry):
    """The memory-mapped corpus of a cache, with the counts of reading its text (documents
    read, skipped and why, tokens), as the in-memory corpus of the same text would have."""
    from .corpus import IndexedCorpus

    corpus = IndexedCorpus(entry.prefix)
    s = entry.stats
    corpus.stats = DataStats(documents_read=s["documents_read"], skipped=Counter(s["skipped"]), tokens_in=s["tokens_in"])
    return corpus
