"""tools/rag_example.py: the retrieval metrics against a brute-force ranking (numpy), and the whole
example against a real server on the tiny summary-mode model (the question's embedding read from
the chat prefill, the answer given the retrieved passages)."""

import json

import numpy as np
import pytest

from tests.launch import load_tool

rag = load_tool("rag_example")


def brute_force(queries, passages, relevant, depth=10):
    sims = queries @ passages.T
    rr, r1, r5 = [], [], []
    for i, rel in enumerate(relevant):
        order = np.argsort(-sims[i], kind="stable")[:depth]
        rank = int(np.flatnonzero(order == rel)[0]) + 1 if rel in order else None
        rr.append(1 / rank if rank else 0.0)
        r1.append(rank == 1)
        r5.append(rank is not None and rank <= 5)
    return {"mrr@10": np.mean(rr), "recall@1": np.mean(r1), "recall@5": np.mean(r5)}


def test_search_metrics_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    passages = rng.normal(size=(40, 16)).astype(np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    queries = passages[:25] + 0.9 * rng.normal(size=(25, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = rag.search_metrics(rag.build_index(passages), queries, list(range(25)))
    want = brute_force(queries, passages, list(range(25)))
    assert 0 < want["mrr@10"] < 1  # neither trivial nor hopeless
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert rag.search_metrics(rag.build_index(passages), passages[:25], list(range(25)))["mrr@10"] == 1.0


@pytest.mark.slow
def test_the_example_runs_against_the_server(serve_models, capsys):
    assert rag.main([serve_models["summary"], "--questions", "12", "--answer", "2", "--max-tokens", "4", "--context-chars", "60"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["questions"] == 12 and out["question_embedding_from_prefill"] is True
    m = out["rows"]["GEM (megatron-gem serve)"]
    assert 0 < m["mrr@10"] <= 1 and m["queries"] == 12
    assert len(out["answers"]) == 2 and all(len(a["retrieved"]) == 3 and isinstance(a["answer"], str) for a in out["answers"])
