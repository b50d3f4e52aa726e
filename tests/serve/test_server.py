"""The real server (``python -m megatron_gem.serve``, uvicorn) under the official async openai
client: it listens on 127.0.0.1 by default; clients mixing embeddings and streaming chat for a
bounded time each get an answer or a 429/503 from the bounded queues, none lost or hung, and the
server's memory stays flat; a client that leaves mid-stream frees its slot at once."""

import asyncio
import re
import time
import urllib.request

import httpx
import openai
import psutil
import pytest

from megatron_gem.testing import sample_sentences
from tests.launch import start_server

pytestmark = pytest.mark.slow
KEY = "test-key"
TEXTS = sample_sentences(16, seed=33, min_words=2, max_words=20)


@pytest.fixture(scope="module")
def server(serve_models):
    server = start_server(
        serve_models["summary"],
        "--api-key",
        KEY,
        "--served-model-name",
        "gem-tiny",
        "--max-queued-generations",
        "1",
        "--max-queued-texts",
        "12",
        "--max-client-batch-size",
        "4",
        "--max-tokens-cap",
        "400",
    )
    yield server.proc, server.url
    code = server.stop()  # uvicorn ends a graceful shutdown by re-raising SIGTERM
    assert code in (0, -15) and "Application shutdown complete" in server.output(), (code, server.output()[-3000:])


def _metric(url, name) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_listens_on_loopback_only(server):
    proc, _url = server
    listening = [c.laddr.ip for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening == ["127.0.0.1"]


async def _load(url, seconds: float, clients: int) -> dict:
    outcomes = {"embeddings": 0, "chat": 0, "429": 0, "503": 0}
    deadline = time.monotonic() + seconds

    async def one_client(i):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        n = 0
        async with client:
            while time.monotonic() < deadline:
                n += 1
                try:
                    if (i + n) % 2:
                        r = await asyncio.wait_for(client.embeddings.create(model="gem-tiny", input=TEXTS[n % 12 : n % 12 + 4]), 60)
                        assert len(r.data) == len(TEXTS[n % 12 : n % 12 + 4]) and len(r.data[0].embedding) == 64
                        outcomes["embeddings"] += 1
                    else:
                        stream = await client.chat.completions.create(
                            model="gem-tiny", messages=[{"role": "user", "content": TEXTS[n % 16]}], max_tokens=8, stream=True, seed=n
                        )
                        chunks = [c async for c in stream]
                        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                        outcomes["chat"] += 1
                except openai.RateLimitError:
                    outcomes["429"] += 1
                except openai.InternalServerError as e:
                    assert e.status_code == 503, e
                    outcomes["503"] += 1

    await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))), seconds + 120)  # none hangs
    return outcomes


def test_mixed_load_is_answered_or_refused_and_memory_stays_flat(server):
    proc, url = server
    first = asyncio.run(_load(url, 3.0, 8))
    rss_after_first = psutil.Process(proc.pid).memory_info().rss
    second = asyncio.run(_load(url, 3.0, 8))
    rss_after_second = psutil.Process(proc.pid).memory_info().rss
    for outcomes in (first, second):
        assert outcomes["embeddings"] > 0 and outcomes["chat"] > 0, outcomes
        assert outcomes["429"] > 0, outcomes  # eight clients against a queue of one answer: some are refused
    total = sum(sum(o.values()) for o in (first, second))
    answered = _metric(url, 'gem_requests_total{endpoint="embeddings",status="200"}') + _metric(url, 'gem_requests_total{endpoint="chat",status="200"}')
    refused = _metric(url, 'gem_requests_total{endpoint="embeddings",status="429"}') + _metric(url, 'gem_requests_total{endpoint="chat",status="429"}')
    assert answered + refused == total  # the server counted every request the clients made, once
    assert _metric(url, 'gem_queue_depth{queue="generation"}') == 0 and _metric(url, 'gem_queue_depth{queue="embeddings"}') == 0
    assert rss_after_second < rss_after_first * 1.10 + 30e6, (rss_after_first, rss_after_second)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    _proc, url = server
    headers = {"Authorization": f"Bearer {KEY}"}
    req = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400, "temperature": 0}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        # Precondition: greedy decoding of this prompt runs the full 400 tokens (no end-of-sequence).
        assert c.post("/v1/chat/completions", json=req).json()["choices"][0]["finish_reason"] == "length"
        cancelled, generated = _metric(url, "gem_generations_cancelled_total"), _metric(url, 'gem_generated_tokens_total{endpoint="generation"}')
        with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 60
        while _metric(url, "gem_generations_cancelled_total") < cancelled + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(url, "gem_generations_cancelled_total") == cancelled + 1
        assert _metric(url, 'gem_generated_tokens_total{endpoint="generation"}') == generated  # the answer was not finished
        assert _metric(url, 'gem_queue_depth{queue="generation"}') == 0
        # The queue holds one answer: the next request is served, not refused.
        assert c.post("/v1/chat/completions", json={**req, "max_tokens": 4}).status_code == 200
