"""tools/preprocess_data.py under bad input: one line on stderr naming the file, line or flag;
exit 2; the tokenizer is loaded only after the paths are checked; nothing on disk touched; an
existing output pair replaced only with --overwrite-output-dir."""

import json
import os

import pytest

from tests.bad_input import forbid, tree
from tests.bad_input import one_error_line as error_line
from tests.launch import load_tool


def preprocess(*argv) -> int:
    return load_tool("preprocess_data").main(["--no-progress", *argv])


def one_error_line(err: str) -> str:
    return error_line(err, "preprocess_data.py")


def _cases(root, tiny_inputs):
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} about a cat"}) + "\n" for i in range(5)))
    latin = root / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    unterminated = root / "unterminated.jsonl"
    unterminated.write_text('{"text": "fine"}\n{"text": "no end\n')
    empty = root / "empty.jsonl"
    empty.write_bytes(b"")
    loop = root / "loop.jsonl"
    os.symlink(loop, loop)
    tokdir = root / "not_a_tokenizer"
    tokdir.mkdir()
    (root / "afile").write_text("x")
    existing = root / "existing"
    for suffix in (".bin", ".idx"):
        (root / f"existing_text_document{suffix}").write_bytes(b"someone's data")
    out = str(root / "out" / "corpus")
    tiny = ["--tokenizer", "tiny"]
    return {
        "input missing": (["--input", str(root / "missing.jsonl"), "--output-prefix", out, *tiny], "missing.jsonl: no such file or directory"),
        "input a link loop": (["--input", str(loop), "--output-prefix", out, *tiny], "loop.jsonl: a symbolic link to nowhere (or a link loop)"),
        "non-UTF-8 line": (["--input", str(latin), "--output-prefix", out, *tiny], f"{latin}:2: invalid UTF-8 at byte"),
        "unterminated string": (
            ["--input", str(unterminated), "--output-prefix", out, *tiny],
            f"{unterminated}:2: malformed JSON (Unterminated string starting at column 10)",
        ),
        "0-byte file": (
            ["--input", str(empty), "--output-prefix", out, *tiny],
            f"{empty}:0: empty file, no documents (--skip-bad-records skips and counts such records)",
        ),
        "tokenizer a typo path": (["--input", str(good), "--output-prefix", out, "--tokenizer", "./no/tok"], "--tokenizer ./no/tok: no such directory"),
        "tokenizer offline repo id": (["--input", str(good), "--output-prefix", out, "--tokenizer", "org/not-cached"], "the hub is off"),
        "tokenizer an empty directory": (
            ["--input", str(good), "--output-prefix", out, "--tokenizer", str(tokdir)],
            f"--tokenizer {tokdir}: is empty: no tokenizer files",
        ),
        "gguf file missing": (
            ["--input", str(good), "--output-prefix", out, "--tokenizer", tiny_inputs["model"], "--gguf-file", "m.gguf"],
            "--gguf-file m.gguf: no such file",
        ),
        "output exists": (
            ["--input", str(good), "--output-prefix", str(existing), *tiny],
            "existing_text_document.bin exists; choose another prefix or pass --overwrite-output-dir",
        ),
        "output under a file": (["--input", str(good), "--output-prefix", str(root / "afile" / "corpus"), *tiny], "afile is not a directory"),
        "workers 0": (["--input", str(good), "--output-prefix", out, *tiny, "--workers", "0"], "--workers 0: must be >= 1"),
    }


CASES = ["input missing", "input a link loop", "non-UTF-8 line", "unterminated string", "0-byte file", "tokenizer a typo path", "tokenizer offline repo id",
         "tokenizer an empty directory", "gguf file missing", "output exists", "output under a file", "workers 0"]  # fmt: skip
READS_DATA = {"non-UTF-8 line", "unterminated string", "0-byte file"}  # found while reading, after the (tiny) tokenizer


@pytest.mark.parametrize("case", CASES)
def test_bad_input_table(tmp_path, tiny_inputs, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    root = tmp_path / "work"
    root.mkdir()
    argv, message = _cases(root, tiny_inputs)[case]
    if case not in READS_DATA:  # the time to fail is bounded by construction: a tokenizer load fails the test
        _forbid_tokenizer(monkeypatch)
    before = tree(root)
    assert preprocess(*argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert message in line and "on_bad" not in line, line
    assert " at at " not in line
    assert tree(root) == before  # no partial output, nothing else touched


def _forbid_tokenizer(monkeypatch):
    import transformers

    forbid(monkeypatch, "a tokenizer load", (transformers.AutoTokenizer, "from_pretrained"))


def test_unreadable_input_is_named(tmp_path, capsys, monkeypatch):
    # As root every file is readable: make the read itself fail as it would for another user.
    import megatron_gem.data.readers as readers

    data = tmp_path / "secret.jsonl"
    data.write_text('{"text": "x"}\n')

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(readers, "_open_binary", denied)
    assert preprocess("--input", str(data), "--output-prefix", str(tmp_path / "o"), "--tokenizer", "tiny") == 2
    assert one_error_line(capsys.readouterr().err) == f"preprocess_data.py: error: {data}: Permission denied"
    assert sorted(os.listdir(tmp_path)) == ["secret.jsonl"]


def test_overwrite_replaces_the_pair_and_nothing_else(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} about a dog"}) + "\n" for i in range(5)))
    prefix = tmp_path / "out" / "corpus"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("precious")
    assert preprocess("--input", str(data), "--output-prefix", str(prefix), "--tokenizer", "tiny") == 0
    first = tree(tmp_path / "out")
    data.write_text("".join(json.dumps({"text": f"another {i}"}) + "\n" for i in range(3)))
    assert preprocess("--input", str(data), "--output-prefix", str(prefix), "--tokenizer", "tiny") == 2
    assert tree(tmp_path / "out") == first
    assert preprocess("--input", str(data), "--output-prefix", str(prefix), "--tokenizer", "tiny", "--overwrite-output-dir") == 0
    from megatron_gem.data import IndexedCorpus

    assert len(IndexedCorpus(f"{prefix}_text_document")) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus_text_document.bin", "corpus_text_document.idx", "notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "precious"
