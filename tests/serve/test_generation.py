"""Chat and text completions: in summary mode the answer is the base model's for the same seed
(the base loaded on its own, without GEM, is the oracle), streaming gives the same text, stop
sequences end it, and return_embedding is the message's embedding read from the prefill the
answer was computed from (equal to GEMEmbedder.encode, with no second pass over the text)."""

import json

import pytest
import torch

from megatron_gem import GEMEmbedder
from tests.serve.conftest import client

MESSAGE = "The old cat sleeps under the red tree."


@pytest.fixture(scope="module")
def base(serve_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(serve_models["base"], dtype=torch.float32), AutoTokenizer.from_pretrained(serve_models["base"])


def base_answer(base, prompt_ids, *, max_new_tokens, temperature, top_p=1.0, seed=None):
    """What the untouched base model generates, with OpenAI's sampling settings."""
    from transformers import GenerationConfig

    model, tok = base
    sample = temperature > 0
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_p=top_p,
        top_k=0,
        repetition_penalty=1.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    gen = out[0, ids.shape[1] :].tolist()
    return tok.decode(gen, skip_special_tokens=True), len(gen)


def chat_prompt(tok, text):
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


def stream_events(response) -> list[dict]:
    lines = [ln for ln in response.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]


@pytest.mark.parametrize("temperature,top_p,seed", [(0.0, 1.0, None), (1.0, 1.0, 7), (0.8, 0.9, 123)])
def test_summary_mode_answers_are_the_base_models(summary_engine, base, temperature, top_p, seed):
    tok = base[1]
    with client(summary_engine) as c:
        body = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 12, "temperature": temperature, "top_p": top_p, "seed": seed},
        ).json()
        text, n = base_answer(base, chat_prompt(tok, MESSAGE), max_new_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
        assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert body["usage"]["completion_tokens"] == n and body["usage"]["prompt_tokens"] == len(chat_prompt(tok, MESSAGE))
        assert body["choices"][0]["finish_reason"] == ("length" if n == 12 else "stop")
        # /v1/completions: the prompt as the tokenizer reads it.
        comp = c.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 9, "temperature": temperature, "top_p": top_p, "seed": seed}).json()
        assert (
            comp["choices"][0]["text"] == base_answer(base, tok("The cat")["input_ids"], max_new_tokens=9, temperature=temperature, top_p=top_p, seed=seed)[0]
        )


def test_streaming_gives_the_same_answer(summary_engine):
    req = {"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 10, "seed": 3}
    with client(summary_engine) as c:
        whole = c.post("/v1/chat/completions", json=req).json()
        events = stream_events(c.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}))
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == whole["choices"][0]["message"]["content"]
        finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
        comp = c.post("/v1/completions", json={"prompt": "A dog", "max_tokens": 8, "seed": 5}).json()
        ev = stream_events(c.post("/v1/completions", json={"prompt": "A dog", "max_tokens": 8, "seed": 5, "stream": True}))
        assert "".join(e["choices"][0]["text"] for e in ev) == comp["choices"][0]["text"]


def test_stop_sequences_end_the_answer(summary_engine):
    req = {"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 24, "temperature": 0}
    with client(summary_engine) as c:
        full = c.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
        assert len(full) > 8
        stop = full[5:7]
        cut = full[: full.find(stop)]
        body = c.post("/v1/chat/completions", json={**req, "stop": [stop, "never-generated-zz"]}).json()
        assert body["choices"][0]["message"]["content"] == cut and body["choices"][0]["finish_reason"] == "stop"
        events = stream_events(c.post("/v1/chat/completions", json={**req, "stop": stop, "stream": True}))
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut


def test_return_embedding_is_read_from_the_prefill(summary_engine, serve_models):
    """The embedding equals GEMEmbedder.encode of the message (an embedder loaded on its own) and
    /v1/embeddings; the answer is the one without the extension; and the model saw the prompt
    once: the tokens it ran are the prompt, the answer's tokens but the last, and K summary tokens."""
    ref = GEMEmbedder.from_pretrained(serve_models["summary"])
    assert ref.config.embed_template == "chat"
    expected = ref.encode([MESSAGE])[0]
    req = {"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 6, "seed": 11}
    seen = []
    hook = summary_engine.embedder.model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        with client(summary_engine) as c:
            plain = c.post("/v1/chat/completions", json=req).json()
            seen.clear()
            body = c.post("/v1/chat/completions", json={**req, "return_embedding": True}).json()
            ran = list(seen)
            emb = c.post("/v1/embeddings", json={"input": MESSAGE}).json()["data"][0]["embedding"]
            events = stream_events(c.post("/v1/chat/completions", json={**req, "return_embedding": True, "stream": True}))
    finally:
        hook.remove()
    assert "embedding" not in plain
    got = torch.tensor(body["embedding"])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0) and torch.allclose(got, torch.tensor(emb), atol=1e-5, rtol=0)
    assert body["choices"] == plain["choices"]
    prompt = body["usage"]["prompt_tokens"]
    assert ran == [prompt] + [1] * (body["usage"]["completion_tokens"] - 1) + [2], ran  # K = 2 summary tokens, one step
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert torch.allclose(torch.tensor(final["embedding"]), expected, atol=1e-5, rtol=0)


def test_return_embedding_refusals(summary_engine, full_engine):
    msg = {"role": "user", "content": MESSAGE}
    with client(summary_engine) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "Be brief."}, msg], "max_tokens": 2, "return_embedding": True})
        assert r.status_code == 400 and "one user message" in r.json()["error"]["message"]
    with client(full_engine) as c:
        r = c.post("/v1/chat/completions", json={"messages": [msg], "max_tokens": 2, "return_embedding": True})
        assert r.status_code == 400 and "--gem-embed-template chat" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": [msg], "max_tokens": 2}).status_code == 200  # plain chat still works


def test_embeddings_run_between_the_decode_steps_of_a_long_answer(summary_engine):
    """An embedding request sent while a long answer is generating is answered before the
    answer ends (its batch runs between two decode steps), and both results are right."""
    import asyncio

    import httpx

    from megatron_gem.serve import ServeConfig, create_app

    app = create_app(summary_engine, ServeConfig(served_model_name="summary", max_tokens_cap=400))
    long = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400, "temperature": 0}

    decode_steps = []
    hook = summary_engine.embedder.model.model.register_forward_pre_hook(
        lambda m, a, kw: decode_steps.append(1) if kw["input_ids"].shape[1] == 1 else None, with_kwargs=True
    )

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=600) as c:
            chat = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
            while len(decode_steps) < 3:  # the answer is being generated
                await asyncio.sleep(0.005)
            emb = await c.post("/v1/embeddings", json={"input": MESSAGE})
            chat_done_when_embedded = chat.done() or len(decode_steps) >= 399  # 399 decode steps after the prefill: the answer's end
            answer = await chat
            await app.state.batcher.stop()
            return emb, chat_done_when_embedded, answer

    loop = asyncio.new_event_loop()
    try:
        emb, chat_done_when_embedded, answer = loop.run_until_complete(run())
    finally:
        loop.close()
        hook.remove()
    assert answer.json()["choices"][0]["finish_reason"] == "length"  # a 400-token answer
    assert not chat_done_when_embedded
    ref = summary_engine.embed_batch(summary_engine.wrap_texts([MESSAGE], 512)[0][:1])
    assert torch.allclose(torch.tensor(emb.json()["data"][0]["embedding"]), ref[0], atol=1e-5, rtol=0)
