"""Bad requests get a 4xx in OpenAI's error shape with a message naming what is wrong, and the
server keeps serving; the API key; the model list, health and Prometheus metrics."""

import pytest

from tests.serve.conftest import client

OK_EMBED = {"input": "The cat runs."}
OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

# (endpoint, body (dict, or raw bytes), status, words the message must hold)
BAD = [
    ("/v1/embeddings", b'{"input": ["a", }', 400, "not valid JSON at line 1"),
    ("/v1/embeddings", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/embeddings", {}, 400, "input: Field required"),
    ("/v1/embeddings", {"input": 5}, 400, "input"),
    ("/v1/embeddings", {"input": [{"text": "a"}]}, 400, "input"),
    ("/v1/embeddings", {"input": ""}, 400, "input[0] is an empty string"),
    ("/v1/embeddings", {"input": []}, 400, "input is empty"),
    ("/v1/embeddings", {"input": [[]]}, 400, "empty token array"),
    ("/v1/embeddings", {"input": [[1, 10**9]]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": ["a"] * 5}, 400, "at most 4 per request"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 3}, 400, "dimensions=3"),
    ("/v1/embeddings", {"input": "a", "inptu_type": "query"}, 400, "inptu_type: unrecognized request argument"),
    ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10_000}, 400, "above this server's cap of 64"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 2}, 400, "one choice per request"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop sequences"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": []}, 400, "tools: unrecognized request argument"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "nope"}, 404, "'nope' does not exist"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 60}, 400, "above the model's 256 tokens"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 65}, 400, "cap of 64"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "only allowed with stream=true"),
]


@pytest.fixture(scope="module")
def app_client(summary_engine):
    with client(summary_engine, max_client_batch_size=4, max_tokens_cap=64, default_max_tokens=8, max_model_len=256) as c:
        yield c


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p[4:].replace('/', '-')}-{i}" for i, (p, *_rest) in enumerate(BAD)])
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(app_client, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = app_client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert app_client.post("/v1/embeddings", json=OK_EMBED).status_code == 200
    assert app_client.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_api_key(summary_engine):
    with client(summary_engine, api_key="s3cret") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/embeddings", json=OK_EMBED, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/chat/completions", json=OK_CHAT).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/embeddings", json=OK_EMBED, headers=good).status_code == 200
        assert c.get("/v1/models", headers=good).json()["data"][0]["id"] == "summary"
        assert c.get("/health").status_code == 200  # probes need no key


def test_models_health_metrics(app_client):
    models = app_client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["summary"] and models["data"][0]["object"] == "model"
    assert app_client.get("/health").json() == {"status": "ok", "model": "summary", "train_mode": "summary"}
    app_client.post("/v1/embeddings", json={"input": ["a b", "c"]})
    app_client.post("/v1/chat/completions", json=OK_CHAT)
    text = app_client.get("/metrics").text
    for line in (
        'gem_requests_total{endpoint="embeddings",status="200"}',
        'gem_requests_total{endpoint="chat",status="200"}',
        'gem_request_latency_seconds_count{endpoint="embeddings"}',
        'gem_queue_depth{queue="embeddings"} 0.0',
        'gem_queue_depth{queue="generation"} 0.0',
        'gem_prompt_tokens_total{endpoint="embeddings"}',
        'gem_generated_tokens_total{endpoint="generation"}',
        "gem_embedded_texts_total",
    ):
        assert line in text, line


def test_start_refuses_limits_that_leave_no_room(summary_engine):
    from megatron_gem.serve import ServeConfig, create_app

    with pytest.raises(ValueError, match="max_input_tokens=20: embed template 'chat'"):
        create_app(summary_engine, ServeConfig(max_input_tokens=20))
    with pytest.raises(ValueError, match="max_batch_tokens=10 is below max_input_tokens"):
        create_app(summary_engine, ServeConfig(max_batch_tokens=10))
