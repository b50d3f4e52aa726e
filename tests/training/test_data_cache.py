"""Text input tokenised once over 2 gloo processes (training/data_setup.open_documents): rank 0
builds the cache while rank 1 waits, both read the in-memory corpus's documents from it, a
second open reuses it, and a bad record on rank 0 is the same error on both ranks."""

import json

import pytest

from tests.launch import run_torchrun


@pytest.mark.multiprocess
def test_two_ranks_tokenise_once_and_share_errors(tmp_path, tiny_tokenizer):
    from megatron_gem.data import open_corpus
    from megatron_gem.testing import sample_sentences

    data, bad, cache = tmp_path / "docs.jsonl", tmp_path / "bad.jsonl", tmp_path / "cache"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(50, seed=2)) + '{"title": "no text"}\n')
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    run_torchrun(["tests/training/data_cache_worker.py", str(tmp_path), str(data), str(bad), str(cache)], nproc=2, timeout=240)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    reference = open_corpus(str(data), tiny_tokenizer, on_bad="skip")  # what each rank tokenised before
    for rank in got:
        assert rank["docs"] == [reference.get(i).tolist() for i in range(len(reference))]
        assert rank["stats"] == reference.stats.report("read")  # incl. "documents skipped: 1 (missing_field: 1)"
        assert rank["error"] is not None and f"{bad}:2" in rank["error"]
    built, reused = got[0]["notes"]
    (directory,) = [p for p in cache.iterdir() if p.name.startswith("docs-") and ".tmp." not in p.name]
    assert built == f"[data cache] built {directory} (50 documents, {reference.num_tokens} tokens of {data})"
    assert reused == built.replace("built", "reused")
    assert got[1]["error"] == got[0]["error"]
    assert sorted(p.name for p in cache.iterdir()) == [directory.name]  # the failed build left nothing
