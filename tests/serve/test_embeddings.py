"""POST /v1/embeddings: the vectors are GEMEmbedder.encode's (summary mode with the chat template
as embed template and a query prompt, K = 2; full mode with a text template, K = 1) for every
input form, batched across concurrent requests by a token budget."""

import asyncio
import base64

import numpy as np
import pytest
import torch

from megatron_gem import GEMEmbedder
from megatron_gem.serve.batching import EmbeddingBatcher
from megatron_gem.testing import sample_sentences
from tests.serve.conftest import client

TEXTS = sample_sentences(7, seed=21, min_words=1, max_words=30) + ["Rain."]
ATOL = 1e-5  # fp32: another batch composition sums the same terms in another order


@pytest.fixture(scope="module")
def references(serve_models):
    """GEMEmbedder loaded on its own (a second copy of the weights), the oracle."""
    return {kind: GEMEmbedder.from_pretrained(serve_models[kind]) for kind in ("summary", "full")}


def _vectors(body):
    return torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


@pytest.mark.parametrize("kind", ["summary", "full"])
def test_vectors_equal_encode(kind, request, references):
    engine = request.getfixturevalue(f"{kind}_engine")
    ref = references[kind]
    with client(engine) as c:
        body = c.post("/v1/embeddings", json={"model": kind, "input": TEXTS}).json()
        assert body["object"] == "list" and body["model"] == kind and len(body["data"]) == len(TEXTS)
        expected = ref.encode(TEXTS)
        assert torch.allclose(_vectors(body), expected, atol=ATOL, rtol=0)
        assert body["usage"]["prompt_tokens"] == sum(len(t) for t in ref.text_tokens(TEXTS))
        # One string; token arrays (the tokenizer's ids of the text); base64.
        one = c.post("/v1/embeddings", json={"input": TEXTS[0]}).json()
        assert torch.allclose(_vectors(one), expected[:1], atol=ATOL, rtol=0)
        ids = [ref.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
        tok = c.post("/v1/embeddings", json={"input": ids}).json()
        assert torch.allclose(_vectors(tok), expected[:3], atol=ATOL, rtol=0)
        single_ids = c.post("/v1/embeddings", json={"input": ids[1]}).json()
        assert torch.allclose(_vectors(single_ids), expected[1:2], atol=ATOL, rtol=0)
        b64 = c.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()
        decoded = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]]))
        assert torch.allclose(decoded, expected[:2], atol=ATOL, rtol=0)


def test_query_prompt(summary_engine, references):
    ref = references["summary"]
    assert ref.prompts == {"query": "query: "}
    queries = ref.encode(TEXTS[:3], prompt_name="query")
    assert (queries - ref.encode(TEXTS[:3])).abs().max() > 1e-3  # the prompt changes the vectors
    with client(summary_engine) as c:
        by_name = c.post("/v1/embeddings", json={"input": TEXTS[:3], "prompt_name": "query"}).json()
        by_type = c.post("/v1/embeddings", json={"input": TEXTS[:3], "input_type": "query"}).json()
        docs = c.post("/v1/embeddings", json={"input": TEXTS[:3], "input_type": "document"}).json()
        assert torch.allclose(_vectors(by_name), queries, atol=ATOL, rtol=0)
        assert torch.allclose(_vectors(by_type), queries, atol=ATOL, rtol=0)
        assert torch.allclose(_vectors(docs), ref.encode(TEXTS[:3]), atol=ATOL, rtol=0)
        r = c.post("/v1/embeddings", json={"input": "x", "prompt_name": "passage"})
        assert r.status_code == 400 and "prompts ['query']" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": [[5, 6]], "prompt_name": "query"})
        assert r.status_code == 400 and "string inputs only" in r.json()["error"]["message"]


def test_long_texts_refused_or_truncated_as_configured(summary_engine, references):
    ref = references["summary"]
    long = " ".join(["the red cat runs under the old tree"] * 30)
    limit = 96  # the tiny tokenizer spends 47 tokens on the chat template
    assert len(ref.text_tokens([long], 10_000)[0]) > limit
    with client(summary_engine, max_input_tokens=limit, max_batch_tokens=limit) as c:
        r = c.post("/v1/embeddings", json={"input": ["short text", long]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "input[1]" in err["message"] and "--auto-truncate" in err["message"]
    with client(summary_engine, max_input_tokens=limit, max_batch_tokens=limit, auto_truncate=True) as c:
        body = c.post("/v1/embeddings", json={"input": ["short text", long]}).json()
        cut = GEMEmbedder.from_pretrained(ref.model, ref.tokenizer, config=ref.config, adapter=ref.adapter, max_length=limit)
        assert torch.allclose(_vectors(body), cut.encode(["short text", long]), atol=ATOL, rtol=0)


def test_concurrent_requests_share_batches(summary_engine, references):
    """Twelve requests at once, through the ASGI app: every answer is its own texts' vectors,
    and the batcher ran fewer forwards than requests."""
    import httpx

    from megatron_gem.serve import ServeConfig, create_app

    app = create_app(summary_engine, ServeConfig(served_model_name="summary", max_batch_tokens=4096))
    expected = references["summary"].encode(TEXTS)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            blocker = asyncio.Event()
            # Hold the worker busy so that the requests queue up behind it.
            summary_engine.worker.submit(lambda: asyncio.run_coroutine_threadsafe(blocker.wait(), loop).result(), urgent=True)
            calls = [c.post("/v1/embeddings", json={"input": [TEXTS[i % len(TEXTS)], TEXTS[(i + 3) % len(TEXTS)]]}) for i in range(12)]
            tasks = [asyncio.ensure_future(x) for x in calls]
            await asyncio.sleep(0.5)
            blocker.set()
            responses = await asyncio.gather(*tasks)
            await app.state.batcher.stop()
            return responses

    loop = asyncio.new_event_loop()
    try:
        responses = loop.run_until_complete(run())
    finally:
        loop.close()
    for i, r in enumerate(responses):
        assert r.status_code == 200
        want = expected[[i % len(TEXTS), (i + 3) % len(TEXTS)]]
        assert torch.allclose(_vectors(r.json()), want, atol=ATOL, rtol=0)
    batches = app.state.metrics.embedding_batches._value.get()
    assert 1 <= batches < 12, batches


class _It:
    def __init__(self, n):
        self.tokens = [0] * n


def test_batch_plan_keeps_the_token_budget():
    batcher = EmbeddingBatcher(None, max_batch_tokens=100, max_batch_requests=4, max_queued_texts=100)
    lengths = [5, 50, 7, 30, 30, 12, 9, 48, 3, 1, 2]
    plan = batcher.plan([_It(n) for n in lengths])
    flat = [len(it.tokens) for b in plan for it in b]
    assert sorted(flat) == sorted(lengths) and flat == sorted(lengths, reverse=True)  # all of them, longest first
    for b in plan:
        assert len(b) <= 4 and len(b) * len(b[0].tokens) <= 100
    assert [len(b) for b in plan] == [2, 3, 4, 2]  # 50+48 | 30,30,12 | 9,7,5,3 | 2,1
