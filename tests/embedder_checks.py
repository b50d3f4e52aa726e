"""What every HF export must pass (tests of both engines and the converters call it): the
sentence-transformers files and the model card are there and in the manifest, and
``SentenceTransformer(dir).encode`` gives GEMEmbedder's vectors, queries with the trained prompt
included. Imported as ``tests.embedder_checks``."""

from __future__ import annotations

import json
import os

import torch

TEXTS = ["The cat runs.", "Rain falls on the old house.", "A long road under the red moon walks into the city.", "x"]


def assert_embedder_ready(directory, *, query_prompt: str = "", manifest: bool = True):
    """Returns (SentenceTransformer, GEMEmbedder) of ``directory`` after the checks."""
    from sentence_transformers import SentenceTransformer

    from megatron_gem import GEMConfig, GEMEmbedder
    from megatron_gem.common.manifest import verify

    d = str(directory)
    names = {"modules.json", "config_sentence_transformers.json", "README.md"}
    if manifest:
        listed = set(verify(d)["files"])
        assert names <= listed, names - listed
    else:
        assert all(os.path.isfile(os.path.join(d, n)) for n in names)
    k = GEMConfig.load(d).num_special_tokens
    with open(os.path.join(d, "config_sentence_transformers.json")) as f:
        st_config = json.load(f)
    assert st_config["prompts"] == ({"query": query_prompt} if query_prompt else {}) and st_config["default_prompt_name"] is None
    with open(os.path.join(d, "modules.json")) as f:
        builtin = all(m["type"].startswith("sentence_transformers.") for m in json.load(f))
    assert builtin == (k == 1), (k, builtin)
    st = SentenceTransformer(d, device="cpu", trust_remote_code=not builtin)
    emb = GEMEmbedder.from_pretrained(d, backend="sdpa")
    ref = emb.encode(TEXTS)
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    if query_prompt:
        q_ref = emb.encode_queries(TEXTS)
        q_st = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True, batch_size=3)
        assert torch.allclose(q_st, q_ref, atol=1e-5), float((q_st - q_ref).abs().max())
        assert torch.allclose(emb.encode([query_prompt + t for t in TEXTS]), q_ref, atol=1e-6)
        assert not torch.allclose(q_ref, ref, atol=1e-3)  # the prompt is really applied
    return st, emb
