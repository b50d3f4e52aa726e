"""GEMEmbedder.embed_from_cache: the K summary steps over a generation prefill equal the plain
readout (encode), in summary mode (the base model's prefill) and full mode (the GEM model's
causal prefill), K = 1 and 2, and leave the caller's cache as it was."""

import pytest
import torch

from megatron_gem import GEMConfig, GEMEmbedder
from megatron_gem.gem.tokens import add_gem_tokens
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences, save_tiny_reserved_base, tiny_summary_model

TEXTS = sample_sentences(3, seed=9) + ["Rain."]
ATOL = 1e-5  # fp32; the step and the one-row forward sum the same terms in another order


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_reserved_base(tmp_path_factory.mktemp("cache_base") / "base", seed=4)


def _embedder(mode, k, base_dir):
    if mode == "summary":
        lm, tok, cfg, adapter = tiny_summary_model(base_dir, k, seed=k)
        return GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa")
    tok = make_tiny_tokenizer()
    lm = make_tiny_llama(len(tok), seed=k)
    cfg = GEMConfig(num_special_tokens=k)
    add_gem_tokens(lm, tok, cfg)
    with torch.no_grad():  # GEM rows unlike the mean, so a wrong readout shows
        lm.get_input_embeddings().weight[cfg.special_token_ids] += 0.5 * torch.randn(k, lm.config.hidden_size, generator=torch.Generator().manual_seed(k))
    return GEMEmbedder.from_pretrained(lm, tok, config=cfg, backend="sdpa")


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _unchanged(cache, snap):
    return len(cache.layers) == len(snap) and all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(cache.layers, snap))


@pytest.mark.parametrize("mode", ["summary", "full"])
@pytest.mark.parametrize("k", [1, 2])
def test_cache_readout_equals_encode(mode, k, base_dir):
    emb = _embedder(mode, k, base_dir)
    for text in TEXTS:
        ids = emb.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            cache = emb.model(input_ids=ids, use_cache=True).past_key_values  # the prefill generation computes
        snap, n = _snapshot(cache), cache.get_seq_length()
        got = emb.embed_from_cache(cache)
        ref = emb.encode([text])
        assert torch.allclose(got, ref, atol=ATOL, rtol=0), (got - ref).abs().max()
        assert cache.get_seq_length() == n and _unchanged(cache, snap)


@pytest.mark.parametrize("mode", ["summary", "full"])
def test_cache_after_generate_and_left_padded_batch(mode, base_dir):
    emb = _embedder(mode, 2, base_dir)
    tok, lm = emb.tokenizer, emb.model
    # generate(): the cache holds the prompt and every generated token but the last.
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    cached = out.sequences[0, :-1].tolist()
    assert out.past_key_values.get_seq_length() == len(cached)
    assert torch.allclose(emb.embed_from_cache(out.past_key_values), emb.encode_token_ids([cached]), atol=ATOL, rtol=0)
    # A left-padded batch prefilled with sdpa and its attention mask (as generate does).
    tokens = [tok(t)["input_ids"] for t in TEXTS]
    width = max(len(t) for t in tokens)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(t)) + t for t in tokens])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tokens])
    lm.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            cache = lm(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True).past_key_values
    finally:
        lm.set_attn_implementation("gem")
    got = emb.embed_from_cache(cache, attention_mask=mask)
    assert torch.allclose(got, emb.encode(TEXTS), atol=ATOL, rtol=0), (got - emb.encode(TEXTS)).abs().max()
    # Control: ignoring the padding (pad keys visible, positions shifted) gives other vectors.
    assert (emb.embed_from_cache(cache) - got).abs().max() > 1e-3


def test_cache_readout_checks_its_inputs(base_dir):
    emb = _embedder("summary", 1, base_dir)
    ids = emb.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = emb.model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="attention_mask has shape"):
        emb.embed_from_cache(cache, attention_mask=torch.ones(1, ids.shape[1] + 1))
    with pytest.raises(TypeError, match="DynamicCache"):
        emb.embed_from_cache([(layer.keys, layer.values) for layer in cache.layers])
    from transformers import StaticCache

    with pytest.raises(TypeError, match="StaticLayer"):
        emb.embed_from_cache(StaticCache(config=emb.model.config, max_cache_len=32))
