"""Text input tokenised once (data/token_cache.py): the cached corpus is the in-memory corpus of the same
text (documents, token ids, counts), reused only for the same content and tokenizer, never
half-written."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_gem.data import DataError, open_corpus
from megatron_gem.data.token_cache import CACHE_INFO, build_or_reuse, cache_key, cacheable, open_cached


def _corpus_files(tmp_path):
    from megatron_gem.testing import sample_sentences

    a, b = tmp_path / "in" / "a.jsonl", tmp_path / "in" / "b.jsonl"
    a.parent.mkdir()
    lines = [json.dumps({"text": s}) for s in sample_sentences(40, seed=3)]
    lines.insert(7, "{not json")  # a bad record, skipped and counted under --skip-bad-records
    lines.insert(12, json.dumps({"body": "no text field"}))
    a.write_text("\n".join(lines) + "\n")
    b.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(25, seed=4)))
    return [str(a), str(b)]


def _docs(corpus):
    return [corpus.get(i).tolist() for i in range(len(corpus))]


def test_cached_corpus_is_the_in_memory_corpus_and_is_reused(tmp_path, tiny_tokenizer, monkeypatch):
    files = _corpus_files(tmp_path)
    reference = open_corpus(files, tiny_tokenizer, on_bad="skip")  # what every rank built before
    entry = build_or_reuse(files, tiny_tokenizer, str(tmp_path / "cache"), on_bad="skip")
    cached = open_cached(entry)
    assert entry.status == "built" and entry.documents == len(reference) == 65
    assert _docs(cached) == _docs(reference)
    assert np.array_equal(cached.lengths, reference.lengths) and cached.fingerprint() == reference.fingerprint()
    assert cached.stats.report("read") == reference.stats.report("read")  # skipped records and why, tokens
    assert dict(cached.stats.skipped) == {"malformed_json": 1, "missing_field": 1}, cached.stats.skipped

    import megatron_gem.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "preprocess_to_indexed", lambda *a, **k: pytest.fail("a second run tokenised again"))
    again = build_or_reuse(files, tiny_tokenizer, str(tmp_path / "cache"), on_bad="skip")
    assert again.status == "reused" and again.directory == entry.directory and _docs(open_cached(again)) == _docs(reference)
    # The key is the content, not the location: a copy of the files elsewhere reuses it too.
    copies = [str(tmp_path / "copy" / os.path.basename(f)) for f in files]
    os.makedirs(tmp_path / "copy")
    for f, c in zip(files, copies):
        shutil.copy(f, c)
    assert build_or_reuse(copies, tiny_tokenizer, str(tmp_path / "cache"), on_bad="skip").status == "reused"


def test_the_key_follows_content_reading_options_and_tokenizer(tmp_path, tiny_tokenizer):
    files = _corpus_files(tmp_path)
    key = cache_key(files, tiny_tokenizer, on_bad="skip")[0]
    assert cache_key(files, tiny_tokenizer, on_bad="skip")[0] == key
    assert cache_key(files, tiny_tokenizer, on_bad="error")[0] != key
    assert cache_key(files, tiny_tokenizer, on_bad="skip", text_field="body")[0] != key
    assert cache_key(files, tiny_tokenizer, on_bad="skip", append_eod=True)[0] != key
    assert cache_key(files[::-1], tiny_tokenizer, on_bad="skip")[0] != key  # document order
    # The tokenizer: one more token (say the GEM special token) changes what text maps to.
    import copy

    other = copy.deepcopy(tiny_tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<|gem_0|>"]})
    assert cache_key(files, other, on_bad="skip")[0] != key
    # One byte of the content.
    data = bytearray(open(files[1], "rb").read())
    data[5] = ord("X") if data[5] != ord("X") else ord("Y")
    open(files[1], "wb").write(bytes(data))
    assert cache_key(files, tiny_tokenizer, on_bad="skip")[0] != key


def test_a_killed_or_damaged_build_is_never_reused(tmp_path, tiny_tokenizer, monkeypatch):
    files, cache = _corpus_files(tmp_path), tmp_path / "cache"
    reference = _docs(open_corpus(files, tiny_tokenizer, on_bad="skip"))
    # Killed mid-write (an exception where a SIGKILL would stop): no cache directory, no leftover.
    from megatron_gem.data import writer

    real_add, calls = writer.IndexedWriter.add, []

    def dying_add(self, tokens):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt("killed while tokenising")
        real_add(self, tokens)

    monkeypatch.setattr(writer.IndexedWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        build_or_reuse(files, tiny_tokenizer, str(cache), on_bad="skip")
    monkeypatch.setattr(writer.IndexedWriter, "add", real_add)
    assert os.listdir(cache) == []
    # A SIGKILL leaves its temporary directory: it is not the cache and is not read.
    entry = build_or_reuse(files, tiny_tokenizer, str(cache), on_bad="skip")
    stale = entry.directory + ".tmp.deadbeef0000"
    shutil.copytree(entry.directory, stale)
    shutil.rmtree(entry.directory)
    rebuilt = build_or_reuse(files, tiny_tokenizer, str(cache), on_bad="skip")
    assert rebuilt.status == "built" and _docs(open_cached(rebuilt)) == reference
    # A cache whose file was cut short (its size differs from cache.json's) is rebuilt, not read.
    with open(rebuilt.prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(rebuilt.prefix + ".bin") - 2)
    fixed = build_or_reuse(files, tiny_tokenizer, str(cache), on_bad="skip")
    assert fixed.status == "built" and fixed.directory == rebuilt.directory and _docs(open_cached(fixed)) == reference
    info = json.loads(open(os.path.join(fixed.directory, CACHE_INFO)).read())
    assert info["sizes"][".bin"] == os.path.getsize(fixed.prefix + ".bin")


def test_a_bad_record_is_an_error_naming_it_and_leaves_no_cache(tmp_path, tiny_tokenizer):
    files, cache = _corpus_files(tmp_path), tmp_path / "cache"
    with pytest.raises(DataError, match=r"a\.jsonl:8"):
        build_or_reuse(files, tiny_tokenizer, str(cache), on_bad="error")
    assert os.listdir(cache) == []


def test_only_local_text_input_is_cached(tmp_path, tiny_tokenizer):
    files = _corpus_files(tmp_path)
    from megatron_gem.data.preprocess import preprocess_to_indexed

    prefix = preprocess_to_indexed(files[1], tiny_tokenizer, str(tmp_path / "mega"), progress=False)[0]
    assert cacheable(files) and cacheable(files[0])
    assert not cacheable(prefix) and not cacheable(prefix + ".bin") and not cacheable("hf:some/dataset") and not cacheable([files[0], "hf:x"])
