"""Demo API: quick tasks, scores, baselines and perplexity on a tiny model (fast, offline)."""

import math
import os

import numpy as np
import pytest
import torch

from megatron_gem.eval import baselines, builders, corpora, quick
from megatron_gem.eval.perplexity import heldout_perplexity

pytestmark = pytest.mark.skipif(
    not (os.path.exists(corpora.WORDNET_DIR) and os.path.exists(corpora.PYTHON_DOC_DIR)),
    reason="needs wordnet-base and python3.11-doc (bash tools/install_corpora.sh)",
)


@pytest.fixture(scope="module")
def tasks():
    return quick.demo_tasks(max_items=30, seed=0)


def test_demo_tasks_deterministic_and_named(tasks):
    assert [t.name for t in tasks] == list(quick.QUICK_TASKS)
    assert all(t.metric in ("mrr", "spearman") for t in tasks)
    again = quick.demo_tasks(max_items=30, seed=0)
    assert [t.queries if hasattr(t, "queries") else t.text1 for t in tasks] == [t.queries if hasattr(t, "queries") else t.text1 for t in again]
    assert all(len(t) <= 30 for t in tasks)


def test_scores_discriminate_perfect_from_random(tasks):
    """An oracle encoder that maps each query to its relevant docs scores MRR 1; a constant
    encoder ranks everything tied and scores the worst rank."""
    faq = tasks[0]
    lookup = {}
    for i, (q, rel) in enumerate(zip(faq.queries, faq.relevant)):
        lookup[q] = i
        for d in rel:
            lookup[faq.docs[d]] = i

    def oracle(texts):
        out = np.zeros((len(texts), len(faq.queries)))
        for r, t in enumerate(texts):
            out[r, lookup[t]] = 1
        return out

    assert quick.score_embeddings(oracle, [faq]) == {"PythonFAQ": 1.0}
    const = quick.score_embeddings(lambda texts: np.ones((len(texts), 4)), [faq])["PythonFAQ"]
    assert const == pytest.approx(1 / len(faq.docs))


def test_pair_score_is_spearman():
    ps = builders.PairSet("toy", ["a", "b", "c"], ["x", "y", "z"], [1.0, 2.0, 3.0], 0, 3)
    vec = {"a": [1, 0], "x": [0, 1], "b": [1, 0], "y": [1, 1], "c": [1, 0], "z": [1, 0.01]}
    assert ps.score(lambda t: np.array([vec[s] for s in t], dtype=float)) == pytest.approx(1.0)
    assert ps.score(lambda t: -np.array([vec[s] if s in "abc" else [-v for v in vec[s]] for s in t], dtype=float)) == pytest.approx(-1.0)


def test_label_set_knn_and_split():
    ls = builders.LabelSet("toy", [f"t{i}" for i in range(12)], ["a"] * 6 + ["b"] * 6, k=3)
    emb = {f"t{i}": [1.0, 0.01 * i] if i < 6 else [0.01 * i, 1.0] for i in range(12)}
    assert ls.score(lambda t: np.array([emb[s] for s in t])) == 1.0
    train, test = ls.split(0.5, seed=0)
    assert sorted(train.texts + test.texts) == sorted(ls.texts)
    assert test.labels.count("a") == 3


@pytest.mark.parametrize("method", baselines.METHODS)
def test_baselines_on_tiny_model(tiny_tokenizer, tiny_llama, tasks, method):
    enc = baselines.CausalLMEncoder(tiny_llama, tiny_tokenizer, method, max_length=64, batch_size=4)
    texts = ["the cat sleeps", "a dog runs under the old tree with the red bird", "water"]
    e = enc(texts)
    assert e.shape == (3, tiny_llama.config.hidden_size) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Batch composition and padding do not change a text's embedding.
    solo = torch.cat([enc([t]) for t in texts])
    assert torch.allclose(e, solo, atol=1e-5)
    scores = quick.score_embeddings(enc, tasks[2:])  # the word-pair tasks: fast
    assert set(scores) == {"SimLex999", "WordSim353"} and all(-1 <= v <= 1 for v in scores.values())
    assert scores == quick.score_embeddings(enc, tasks[2:])  # deterministic


def test_baseline_layouts(tiny_tokenizer, tiny_llama):
    mean = baselines.mean_pooling_encoder(tiny_llama, tiny_tokenizer)
    ids, pool = mean.layout("the cat")
    assert ids[0] == tiny_tokenizer.bos_token_id and pool == list(range(1, len(ids)))
    echo = baselines.echo_encoder(tiny_llama, tiny_tokenizer)
    ids, pool = echo.layout("the cat")
    x = tiny_tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert [ids[p] for p in pool] == x and ids[-len(x) :] == x
    assert ids.count(x[0]) >= 2  # two copies
    last = baselines.last_token_encoder(tiny_llama, tiny_tokenizer)
    assert last.layout("the cat")[1] == [len(last.layout("the cat")[0]) - 1]
    eol = baselines.prompteol_encoder(tiny_llama, tiny_tokenizer, max_length=40)
    ids, pool = eol.layout("the cat " * 50)
    assert len(ids) == 40 and pool == [39]
    for m in ("echo", "prompteol"):
        with pytest.raises(ValueError, match="no room"):
            baselines.CausalLMEncoder(tiny_llama, tiny_tokenizer, m, max_length=8)
    with pytest.raises(ValueError, match="pooling method"):
        baselines.CausalLMEncoder(tiny_llama, tiny_tokenizer, "max")


def test_perplexity_matches_a_direct_computation(tiny_tokenizer, tiny_llama):
    texts = ["the cat sleeps under the tree.", "a red bird sings", "water"]
    ppl = heldout_perplexity(tiny_llama, tiny_tokenizer, texts, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tiny_tokenizer(t)["input_ids"]])
            logits = tiny_llama(input_ids=ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    # A random 2-layer model is close to uniform over its vocabulary.
    assert 0.3 * len(tiny_tokenizer) < ppl < 3 * len(tiny_tokenizer)
    assert heldout_perplexity(tiny_llama, tiny_tokenizer, texts, batch_size=1) == pytest.approx(ppl, rel=1e-4)
