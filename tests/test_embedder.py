import pytest
import torch

from megatron_gem import GEMConfig, GEMEmbedder
from megatron_gem.gem.tokens import add_gem_tokens

TEXTS = [
    "The cat sleeps under the old tree.",
    "Rain.",
    "A model learns the meaning of a text from its summary token while the river runs.",
    "Two dogs walk near the house.",
    "The blue bird sings.",
]


@pytest.fixture
def embedder(tiny_llama):
    from megatron_gem.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()  # a fresh one: adding tokens mutates it
    cfg = GEMConfig(num_special_tokens=2)
    add_gem_tokens(tiny_llama, tok, cfg)
    return GEMEmbedder.from_pretrained(tiny_llama, tok, config=cfg)


def test_unit_vectors_of_hidden_size(embedder):
    e = embedder.encode(TEXTS)
    assert e.shape == (len(TEXTS), embedder.model.config.hidden_size) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert not torch.allclose(e[0], e[1])


def test_padding_side_and_batch_composition_do_not_change_embeddings(embedder):
    ref = torch.stack([embedder.encode([t])[0] for t in TEXTS])  # each alone, no padding
    right = embedder.encode(TEXTS, batch_size=3, padding_side="right")
    left = embedder.encode(TEXTS, batch_size=5, padding_side="left")
    shuffled = embedder.encode(TEXTS[::-1], batch_size=2)[torch.arange(len(TEXTS) - 1, -1, -1)]
    for got in (right, left, shuffled):
        assert torch.allclose(got, ref, atol=1e-5)


def test_readout_uses_the_special_tokens_under_the_gem_mask(embedder):
    # K=2 specials do not see each other: the embedding is the mean of two states that each
    # saw only the text (and themselves). Recompute that by hand: one causal pass per special
    # token, placed at its own position n + j after the n text tokens.
    model, tok = embedder.model, embedder.tokenizer
    ids = tok(TEXTS[0])["input_ids"]
    n = len(ids)
    states = []
    for j, s in enumerate(embedder.special_ids):
        x = torch.tensor([ids + [s]])
        pos = torch.tensor([list(range(n)) + [n + j]])
        states.append(model.base_model(x, position_ids=pos, use_cache=False).last_hidden_state[0, -1])
    model.set_attn_implementation("gem")
    expected = torch.nn.functional.normalize(torch.stack(states).mean(0), dim=-1)
    assert torch.allclose(embedder.encode([TEXTS[0]])[0], expected, atol=1e-5)


def test_from_checkpoint_directory(embedder, tmp_path):
    embedder.model.save_pretrained(tmp_path)
    embedder.tokenizer.save_pretrained(tmp_path)
    embedder.config.save(tmp_path)
    loaded = GEMEmbedder.from_pretrained(tmp_path)
    assert loaded.special_ids == embedder.special_ids
    assert torch.allclose(loaded.encode(TEXTS), embedder.encode(TEXTS), atol=1e-5)
    assert loaded.encode(TEXTS, convert_to_numpy=True).shape == (len(TEXTS), loaded.model.config.hidden_size)


def test_clear_errors(embedder, tiny_llama):
    from megatron_gem.testing import make_tiny_tokenizer

    with pytest.raises(ValueError, match="no GEM tokens"):
        GEMEmbedder.from_pretrained(tiny_llama, make_tiny_tokenizer())
    with pytest.raises(TypeError, match="list of texts"):
        embedder.encode("one string")
    with pytest.raises(FileNotFoundError, match="gem_config.json"):
        GEMEmbedder.from_pretrained("/nonexistent/dir")
