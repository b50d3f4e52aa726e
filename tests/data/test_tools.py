"""The command-line tools: preprocess_data (Megatron .bin/.idx) and bench_data."""

import json
import os

import numpy as np

from tests.launch import REPO, run_python


def run(tool, *args):
    return run_python([os.path.join(REPO, "tools", tool), *args], timeout=300, check=False, env={"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})


def test_preprocess_cli(tmp_path, tiny_tokenizer):
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"content": f"document number {i} about a cat"}) + "\n" for i in range(50)))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"content": "fine"}\n{"content": oops}\n{"other": 1}\n{"content": "  "}\n')
    out = tmp_path / "out" / "corpus"
    r = run(
        "preprocess_data.py",
        "--input",
        str(good),
        str(bad),
        "--output-prefix",
        str(out),
        "--tokenizer",
        "tiny",
        "--json-keys",
        "content",
        "--append-eod",
        "--workers",
        "2",
    )
    assert r.returncode == 2 and f"{bad}:2: malformed JSON" in r.stderr
    assert not os.path.exists(f"{out}_content_document.bin")  # no partial output left behind
    r = run(
        "preprocess_data.py",
        "--input",
        str(good),
        str(bad),
        "--output-prefix",
        str(out),
        "--tokenizer",
        "tiny",
        "--json-keys",
        "content",
        "--append-eod",
        "--workers",
        "2",
        "--skip-bad-records",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["documents_read"] == 51
    assert summary["skipped"] == {"empty": 1, "malformed_json": 1, "missing_field": 1}
    assert "tokenising" in r.stderr  # progress bar
    from megatron_gem.data import IndexedCorpus

    c = IndexedCorpus(summary["output_prefix"])
    assert len(c) == 51 and c.num_tokens == summary["tokens_in"]
    expect = tiny_tokenizer("document number 7 about a cat")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert c.get(7).tolist() == expect
    assert c.file.dtype == np.uint16  # megatron-core's choice for a small vocabulary
    r = run("preprocess_data.py", "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(out), "--tokenizer", "tiny")
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr


def test_bench_reports_json(tmp_path):
    r = run("bench_data.py", "--corpus", str(tmp_path / "absent"))
    assert r.returncode == 2 and "not found" in r.stderr
    pydoc = "/usr/share/doc/python3.11/html/_sources"
    corpus = pydoc if os.path.isdir(pydoc) else None
    if corpus is None:  # still exercise the tool on a small generated corpus
        from megatron_gem.testing import sample_sentences

        corpus = str(tmp_path / "c.txt")
        with open(corpus, "w") as f:
            f.write("\n\n".join(sample_sentences(3000, seed=0)))
    r = run("bench_data.py", "--corpus", corpus, "--tiny-tokenizer", "--max-documents", "4000", "--seq-length", "1024")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["seq_length"] == 1024 and result["tokenizer"].startswith("tiny")
    assert result["tokens_out"] >= result["tokens_in"] > 0
    for key in ("tokenize_tokens_per_s_per_core", "packed_tokens_per_s_per_core", "packed_tokens_per_s_per_core_indexed", "peak_memory_mb"):
        assert result[key] > 0
    assert 0 <= result["padding_fraction"] < 0.05
    assert result["meets_targets"] == (
        min(result["packed_tokens_per_s_per_core"], result["packed_tokens_per_s_per_core_indexed"]) >= 1e6 and result["padding_fraction"] <= 0.01
    )
