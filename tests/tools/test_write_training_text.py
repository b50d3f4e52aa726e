"""tools/write_training_text.py: flags checked before any corpus is read, and a run that writes
the jsonl and its counts (package descriptions from a small control file)."""

import json
import os

import pytest

from megatron_gem.eval import corpora
from tests.launch import load_tool

STATUS = """Package: widget-tools
Source: widgets
Description: tools that frob the widgets of a workshop
 The widget tools frob every widget of a small workshop quickly and quietly.
 .
 Short line.

Package: coreutils
Description: GNU core utilities
 This package contains the basic file, shell and text manipulation utilities.
"""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-per-source", "0"], "--max-per-source must be >= 1"),
        (["--debian-packages", "/no/such/file"], "--debian-packages /no/such/file: no such file"),
        (["--sources", "the-web"], "invalid choice: 'the-web'"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        load_tool("write_training_text").main(["--out", str(tmp_path / "x.jsonl"), *argv])
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.jsonl")


@pytest.mark.parametrize("existing", ["x.jsonl", "x.counts.json"])
def test_an_existing_output_is_refused_and_kept(tmp_path, capsys, monkeypatch, existing):
    """A user's file at --out (or where its counts would go) is refused before any corpus is
    read, and left byte for byte."""
    from megatron_gem.eval import training_text

    monkeypatch.setattr(training_text, "distillation_texts", lambda *a, **k: pytest.fail("a corpus was read"))
    (tmp_path / existing).write_text("the user's own file\n")
    with pytest.raises(SystemExit):
        load_tool("write_training_text").main(["--out", str(tmp_path / "x.jsonl")])
    assert f"{tmp_path / existing} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / existing).read_text() == "the user's own file\n"


@pytest.mark.skipif(
    not os.path.isdir(corpora.WORDNET_DIR) or not os.path.isdir(corpora.INFO_DIR), reason="corpora not installed (bash tools/install_corpora.sh)"
)
def test_writes_the_text_and_its_counts(tmp_path, capsys):
    status = tmp_path / "status"
    status.write_text(STATUS)
    out = tmp_path / "descriptions.jsonl"
    load_tool("write_training_text").main(["--out", str(out), "--sources", "debian-descriptions", "--debian-packages", str(status)])
    records = [json.loads(line) for line in open(out)]
    # coreutils is an evaluated package (its info manual is the held-out task): not written.
    assert sorted(r["text"] for r in records) == [
        "The widget tools frob every widget of a small workshop quickly and quietly.",
        "tools that frob the widgets of a workshop",
    ]
    assert {r["source"] for r in records} == {"debian-descriptions"}
    counts = json.load(open(tmp_path / "descriptions.counts.json"))
    assert counts["debian-descriptions"] == {"read": 5, "kept": 2, "dropped: shorter than 5 words": 1, "dropped: a package an evaluation reads": 2}
    assert counts["written"] == 2
    assert "wrote 2 texts" in capsys.readouterr().out
    # A second run to the same file: refused, then with --overwrite replaced (here by 1 text).
    argv = ["--out", str(out), "--sources", "debian-descriptions", "--debian-packages", str(status), "--limit", "1"]
    with pytest.raises(SystemExit):
        load_tool("write_training_text").main(argv)
    assert len(open(out).readlines()) == 2
    load_tool("write_training_text").main([*argv, "--overwrite"])
    assert len(open(out).readlines()) == 1 and json.load(open(tmp_path / "descriptions.counts.json"))["written"] == 1
