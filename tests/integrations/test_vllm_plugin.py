"""GEM embeddings in vLLM (megatron_gem/integrations/vllm_plugin, docs/vllm.md): ``vllm serve``
of a full-mode export and of a summary-mode adapter folder, queried with the official openai
client on 127.0.0.1, gives GEMEmbedder's vectors (the oracle: our own implementation of the
layout, the mask and the deltas, computed here in .venv with the project's transformers).

vLLM runs in its own environment (.venv-vllm, ``make vllm-venv``); these tests are marked
``vllm`` (``make test-vllm``; ``make test`` deselects them) and skip when it is absent. Each
server takes 1-3 minutes to start on two cores: one per mode, shared by the module.

The tiny models have weights large enough (initializer_range 0.2) that different texts get
clearly different vectors; each check also shows that the vectors a server would give without
the GEM layout (or without the deltas) are far from GEMEmbedder's, so cosine >= 0.9999 can fail.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_gem.embedder import GEMEmbedder
from megatron_gem.hf.export import export_summary_adapter
from megatron_gem.integrations.vllm_plugin.server import stop_vllm_server
from megatron_gem.testing import RESERVED_TOKENS, sample_sentences, save_tiny_gem_export, save_tiny_reserved_base, tiny_summary_model
from tests.launch import VLLM_PYTHON, start_vllm

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="vLLM's environment .venv-vllm is absent (make vllm-venv)"),
]

# vLLM's CPU attention needs a head size >= 32: 2 heads of 32 in the tiny Llama's 64 dimensions.
TINY = dict(num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
TEMPLATE = 'This text : "{text}" means in one word:"'
MAX_LEN = 256
# Mixed lengths in one request (one forward: the deltas' rows of several prompts); the last
# holds the summary token itself, which is text (no deltas) everywhere but at the end.
TEXTS = sample_sentences(5, seed=11) + ["x", f"A text with {RESERVED_TOKENS[0]} inside it."]
LONG = " ".join(sample_sentences(40, seed=12))  # well over MAX_LEN tokens
COS = 0.9999


def _cos(a, b):
    return F.cosine_similarity(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), dim=-1)


def _plain_last_states(model, token_lists):
    """Normalised last-token states of a causal forward over each token list: what a server
    computes for those tokens with last-token pooling and no GEM deltas."""
    with torch.no_grad():
        return torch.stack([F.normalize(model.model(input_ids=torch.tensor([t])).last_hidden_state[0, -1], dim=-1) for t in token_lists])


@pytest.fixture(scope="module")
def full_export(tmp_path_factory):
    return save_tiny_gem_export(tmp_path_factory.mktemp("vllm_full") / "export", seed=5, row_noise=1.0, embed_template=TEMPLATE, **TINY)


@pytest.fixture(scope="module")
def summary_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_summary")
    base = save_tiny_reserved_base(root / "base", seed=6, **TINY)
    lm, tok, cfg, adapter = tiny_summary_model(base, 1, seed=7)
    return export_summary_adapter(lm, adapter, tok, cfg, str(root / "adapter"), {"step": 1}, base_path=base), base


@pytest.fixture(scope="module")
def full_server(full_export):
    proc, url, log = start_vllm(full_export, "--dtype", "float32", "--max-model-len", MAX_LEN)
    yield url
    stop_vllm_server(proc)
    os.unlink(log)


@pytest.fixture(scope="module")
def summary_server(summary_folder):
    proc, url, log = start_vllm(summary_folder[0], "--dtype", "float32", "--max-model-len", MAX_LEN)
    yield url, log
    stop_vllm_server(proc)
    os.unlink(log)


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _embed(url, inputs, **extra):
    client = _client(url)
    model = client.models.list().data[0].id
    out = client.embeddings.create(model=model, input=inputs, encoding_format="float", extra_body=extra or None)
    return torch.tensor([d.embedding for d in sorted(out.data, key=lambda d: d.index)])


def test_full_export_gives_gemembedder_vectors(full_export, full_server):
    embedder = GEMEmbedder.from_pretrained(full_export, backend="sdpa", max_length=MAX_LEN)
    ref = embedder.encode(TEXTS)
    got = _embed(full_server, TEXTS)
    assert got.shape == ref.shape
    assert (_cos(got, ref) >= COS).all(), _cos(got, ref)
    # Without the template and the summary token (vLLM's own pooling of the text) the vectors are far off.
    plain = _plain_last_states(embedder.model, [embedder.tokenizer(t)["input_ids"] for t in TEXTS])
    assert (_cos(plain, ref) < 0.99).all()


def test_full_export_token_ids_truncation_and_raw_vectors(full_export, full_server):
    embedder = GEMEmbedder.from_pretrained(full_export, backend="sdpa", max_length=MAX_LEN)
    # Token ids are the text's tokens: the summary token is appended, no template (encode_token_ids).
    tokens = [embedder.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    got = _embed(full_server, tokens)
    assert (_cos(got, embedder.encode_token_ids(tokens)) >= COS).all()
    # truncate_prompt_tokens cuts the text and keeps the template and the summary token (GEMEmbedder's max_length).
    got = _embed(full_server, [LONG, TEXTS[0]], truncate_prompt_tokens=64)
    ref = GEMEmbedder.from_pretrained(full_export, backend="sdpa", max_length=64).encode([LONG, TEXTS[0]])
    assert (_cos(got, ref) >= COS).all()
    # use_activation=false (vLLM's field): the state itself, as encode(normalize=False).
    got = _embed(full_server, TEXTS[:2], use_activation=False)
    ref = embedder.encode(TEXTS[:2], normalize=False)
    assert (_cos(got, ref) >= COS).all() and torch.allclose(got.norm(dim=-1), ref.norm(dim=-1), rtol=1e-4)


def test_full_export_refusals_keep_serving(full_server):
    import httpx
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="maximum context length"):  # over the model length, no truncation asked: 400
        _embed(full_server, [LONG])
    r = httpx.post(full_server + "/v1/embeddings", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 400 and "send the text as `input`" in r.text
    with pytest.raises(BadRequestError, match="padding"):
        _embed(full_server, ["a text"], padding="max_length")
    assert _embed(full_server, ["still serving"]).shape[0] == 1


def test_summary_adapter_gives_gemembedder_vectors(summary_folder, summary_server):
    folder, base = summary_folder
    url, log = summary_server
    embedder = GEMEmbedder.from_pretrained(folder, backend="sdpa", max_length=MAX_LEN)
    ref = embedder.encode(TEXTS)
    got = _embed(url, TEXTS)
    assert (_cos(got, ref) >= COS).all(), _cos(got, ref)
    # The base model alone on the same layout (the deltas left out) is far off: the deltas act.
    base_only = _plain_last_states(embedder.model, [t + embedder.special_ids for t in embedder.text_tokens(TEXTS)])
    assert (_cos(base_only, ref) < 0.99).all()
    # One text at a time (a batch of one prompt) gives the same vectors as the mixed batch.
    single = torch.cat([_embed(url, [t]) for t in TEXTS[-2:]])
    assert (_cos(single, ref[-2:]) >= COS).all()
    # Each prompt ran whole from position 0 (the deltas' rows), eagerly (the deltas are hooks).
    with open(log) as f:
        text = f.read()
    assert "enable_prefix_caching=False, enable_chunked_prefill=False" in text and "'mode': <CompilationMode.NONE: 0>" in text


def test_a_gem_export_served_as_a_plain_llama_is_refused(full_export):
    """Without GEMForEmbedding vLLM would pool the bare text: the plugin refuses at startup."""
    import subprocess

    from tests.launch import REPO, subprocess_env

    env = subprocess_env(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    cmd = [VLLM_PYTHON, "-m", "megatron_gem.integrations.vllm_plugin", "vllm", "serve", full_export, "--runner", "pooling", "--port", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "is a GEM export: as a plain LlamaForCausalLM pooling model" in proc.stdout + proc.stderr
