"""Reading inputs: formats, and every kind of bad input (error naming file and line, or skip + count)."""

import gzip
import json

import numpy as np
import pytest

from megatron_gem.data import DataError, DataStats, IndexedCorpus, InMemoryCorpus, iter_documents, iter_hf_documents, open_corpus


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def texts(paths, **kw):
    return [d.text for d in iter_documents(paths, **kw)]


def test_jsonl_custom_field_and_line_numbers(tmp_path):
    p = write(tmp_path / "a.jsonl", b'{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    docs = list(iter_documents(p, text_field="body"))
    assert [d.text for d in docs] == ["one", "two"]
    assert [d.where for d in docs] == [f"{p}:1", f"{p}:3"]


def test_json_array_txt_units_gz(tmp_path):
    arr = write(tmp_path / "a.json", json.dumps([{"text": "x y"}, {"text": "z"}], indent=1).encode())
    assert texts(arr) == ["x y", "z"]
    txt = write(tmp_path / "b.txt", b"para one\nstill one\n\npara two\n")
    assert texts(txt) == ["para one\nstill one\n\npara two"]
    assert texts(txt, txt_unit="paragraph") == ["para one\nstill one", "para two"]
    assert texts(txt, txt_unit="line") == ["para one", "still one", "para two"]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "zipped"}\n')
    assert texts(str(gz)) == ["zipped"]
    # directories expand to their known files, sorted
    assert texts(str(tmp_path)) == ["x y", "z", "para one\nstill one\n\npara two", "zipped"]


def test_parquet_and_hf_dataset_object(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["alpha beta", "  ", "gamma"]})
    path = str(tmp_path / "d.parquet")
    ds.to_parquet(path)
    stats = DataStats()
    assert texts(path, text_field="content", stats=stats) == ["alpha beta", "gamma"]
    assert stats.skipped == {"empty": 1}
    stats = DataStats()
    assert [d.text for d in iter_hf_documents(ds, text_field="content", stats=stats)] == ["alpha beta", "gamma"]
    with pytest.raises(DataError, match=r"record 0: no field 'text'"):
        list(iter_hf_documents(ds))


BAD_CASES = [
    # name, file bytes, error pattern (with the line), skip reason
    ("malformed", b'{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n', r"bad\.jsonl:2: malformed JSON", "malformed_json"),
    ("missing", b'{"text": "ok"}\n{"body": "no text"}\n{"text": "fine"}\n', r"bad\.jsonl:2: no field 'text' \(fields: body\)", "missing_field"),
    ("utf8", b'{"text": "ok"}\n{"text": "\xff\xfe bad"}\n{"text": "fine"}\n', r"bad\.jsonl:2: invalid UTF-8", "invalid_utf8"),
    ("notstr", b'{"text": "ok"}\n{"text": 5}\n{"text": "fine"}\n', r"bad\.jsonl:2: text is int", "not_a_string"),
    ("array", b'{"text": "ok"}\n[1, 2]\n{"text": "fine"}\n', r"bad\.jsonl:2: record is a JSON list", "not_an_object"),
]


@pytest.mark.parametrize("name,data,pattern,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_records_error_or_skip(tmp_path, name, data, pattern, reason):
    p = write(tmp_path / "bad.jsonl", data)
    with pytest.raises(DataError, match=pattern):
        list(iter_documents(p))
    stats = DataStats()
    assert texts(p, on_bad="skip", stats=stats) == ["ok", "fine"]
    assert stats.skipped == {reason: 1}
    assert stats.documents_read == 2
    assert f"{reason}: 1" in stats.report()


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path):
    p = write(tmp_path / "e.jsonl", b'{"text": ""}\n{"text": " \\n\\t "}\n{"text": "real"}\n')
    stats = DataStats()
    assert texts(p, stats=stats) == ["real"]  # not an error: valid records with nothing to train on
    assert stats.skipped == {"empty": 2}


def test_empty_file_and_missing_path(tmp_path):
    empty = write(tmp_path / "empty.jsonl", b"")
    blank = write(tmp_path / "blank.jsonl", b"\n\n")
    good = write(tmp_path / "good.jsonl", b'{"text": "a"}\n')
    with pytest.raises(DataError, match=r"empty\.jsonl:0: empty file"):
        list(iter_documents(empty))
    with pytest.raises(DataError, match=r"blank\.jsonl:0: file holds no records"):
        list(iter_documents(blank))
    stats = DataStats()
    assert texts([empty, blank, good], on_bad="skip", stats=stats) == ["a"]
    assert stats.skipped == {"empty_file": 2}
    # a missing input is a configuration error even when skipping bad records
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_documents([good, str(tmp_path / "nope.jsonl")], on_bad="skip"))
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet: pattern matches no file"):
        list(iter_documents(str(tmp_path / "*.parquet")))


def test_malformed_json_array_names_line(tmp_path):
    p = write(tmp_path / "arr.json", b'[\n {"text": "a"},\n {"text": "b" oops}\n]\n')
    with pytest.raises(DataError, match=r"arr\.json:3: malformed JSON"):
        list(iter_documents(p))


def test_huge_document_limit_and_tokenising(tmp_path, tiny_tokenizer):
    big = "word " * 200_000
    p = write(tmp_path / "huge.jsonl", (json.dumps({"text": "small one"}) + "\n" + json.dumps({"text": big}) + "\n").encode())
    with pytest.raises(DataError, match=r"huge\.jsonl:2: text has 1000000 characters > max_chars=100000"):
        list(iter_documents(p, max_chars=100_000))
    stats = DataStats()
    assert texts(p, max_chars=100_000, on_bad="skip", stats=stats) == ["small one"]
    assert stats.skipped == {"too_long": 1}
    # without a limit the huge document is read whole (chunking happens at packing time)
    corpus = open_corpus(p, tiny_tokenizer)
    assert len(corpus) == 2 and corpus.lengths[1] > 100_000
    assert corpus.stats.tokens_in == int(corpus.lengths.sum())


def test_open_corpus_kinds(tmp_path, tiny_tokenizer):
    from megatron_gem.data.preprocess import preprocess_to_indexed

    p = write(tmp_path / "a.jsonl", b'{"text": "the cat"}\n{"text": "a dog runs"}\n')
    mem = open_corpus(p, tiny_tokenizer)
    assert isinstance(mem, InMemoryCorpus) and mem.stats.documents_read == 2
    prefix, _ = preprocess_to_indexed(p, tiny_tokenizer, str(tmp_path / "out"), progress=False)
    idx = open_corpus(prefix)
    assert isinstance(idx, IndexedCorpus)
    assert np.array_equal(idx.lengths, mem.lengths) and all(np.array_equal(idx.get(i), mem.get(i)) for i in range(2))
    with pytest.raises(DataError, match="no usable documents"):
        open_corpus(write(tmp_path / "e.jsonl", b'{"text": " "}\n'), tiny_tokenizer)


def test_pair_negatives_field_errors_name_file_line_and_missing_ones_are_counted(tmp_path, tiny_tokenizer):
    from megatron_gem.data import open_pair_corpus

    def write(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    ok = write(
        "ok.jsonl", [{"q": "a b", "p": "c d", "n": ["e f", " ", "g"]}, {"q": "h", "p": "i"}, {"q": "j", "p": "k", "n": "l m"}, {"q": "o", "p": "r", "n": []}]
    )
    pairs = open_pair_corpus(ok, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n")
    assert len(pairs) == 4 and pairs.negatives.counts.tolist() == [2, 0, 1, 0]
    assert (pairs.stats.hard_negatives, pairs.stats.records_without_negatives, pairs.stats.empty_negatives) == (3, 2, 1)
    assert pairs.positives.get(0).tolist() == tiny_tokenizer("c d")["input_ids"]
    assert [t.tolist() for t in pairs.negatives.get(0)] == [tiny_tokenizer("e f")["input_ids"], tiny_tokenizer("g")["input_ids"]]

    bad = write("bad.jsonl", [{"q": "a", "p": "b", "n": "c"}, {"q": "a", "p": "b", "n": ["c", 3]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'n' item 1 is int, not a string"):
        open_pair_corpus(bad, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n")
    skipped = open_pair_corpus(bad, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n", on_bad="skip")
    assert len(skipped) == 1 and dict(skipped.stats.skipped) == {"not_a_string": 1}
    wrong_type = write("obj.jsonl", [{"q": "a", "p": "b", "n": {"text": "c"}}])
    with pytest.raises(DataError, match=r"obj.jsonl:1: field 'n' is dict, not a string or a list of strings"):
        open_pair_corpus(wrong_type, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n")
    with pytest.raises(DataError, match=r"ok.jsonl:2: no 'n' texts .*required"):
        open_pair_corpus(ok, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n", negatives_required=True)
    required = open_pair_corpus(ok, tiny_tokenizer, query_field="q", positive_field="p", negative_field="n", negatives_required=True, on_bad="skip")
    assert len(required) == 2 and dict(required.stats.skipped) == {"missing_negatives": 2}
