import pytest
import torch

from megatron_gem.gem import GEMConfig
from megatron_gem.gem.tokens import add_gem_tokens, find_gem_tokens
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_start_at_the_mean(tied):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    cfg = GEMConfig(num_special_tokens=3)
    ids = add_gem_tokens(model, tok, cfg)
    assert ids == cfg.special_token_ids == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    assert len(set(ids)) == 3 and tok.convert_ids_to_tokens(ids) == cfg.special_tokens
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok)
    assert (head is emb) == tied
    for i in ids:
        assert torch.allclose(emb[i], old_in.mean(0), atol=1e-6)
        assert torch.allclose(head[i], (old_in if tied else old_out).mean(0), atol=1e-6)
    # the old rows are untouched
    assert torch.equal(emb[: old_in.shape[0]], old_in)
    # the tokenizer keeps special tokens whole
    assert tok("hello <|gem_1|>")["input_ids"][-1] == ids[1]


def test_adding_is_idempotent():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    ids = add_gem_tokens(model, tok, GEMConfig(num_special_tokens=2))
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[0]] += 1.0  # "trained"
    trained = model.get_input_embeddings().weight.detach().clone()
    assert add_gem_tokens(model, tok, GEMConfig(num_special_tokens=2)) == ids
    assert torch.equal(model.get_input_embeddings().weight, trained), "re-adding must not re-initialise"


def test_padded_vocabulary_reuses_rows_without_growing():
    tok = make_tiny_tokenizer()
    rows = len(tok) + 8
    model = make_tiny_llama(rows)  # vocabulary padded beyond the tokenizer
    before = model.get_input_embeddings().weight.detach().clone()
    ids = add_gem_tokens(model, tok, GEMConfig())
    assert ids[0] < rows and model.get_input_embeddings().weight.shape[0] == rows
    assert torch.allclose(model.get_input_embeddings().weight[ids[0]], before.mean(0), atol=1e-6)


def test_refuses_a_name_with_another_meaning():
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<|gem_0|>"])  # an ordinary (non-special) token of that name
    with pytest.raises(ValueError, match="ordinary token"):
        add_gem_tokens(make_tiny_llama(len(tok)), tok, GEMConfig())


def test_refuses_a_tokenizer_extended_for_another_k():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    add_gem_tokens(model, tok, GEMConfig(num_special_tokens=1))
    with pytest.raises(ValueError, match="num_special_tokens"):
        find_gem_tokens(tok, GEMConfig(num_special_tokens=2))


def test_refuses_model_and_tokenizer_from_different_checkpoints():
    tok = make_tiny_tokenizer()
    add_gem_tokens(make_tiny_llama(len(tok)), tok, GEMConfig())
    with pytest.raises(ValueError, match="different checkpoints"):
        add_gem_tokens(make_tiny_llama(len(tok) - 1), tok, GEMConfig())


@pytest.mark.parametrize("summary", [False, True])
def test_the_data_tokenizer_is_the_one_the_model_build_leaves(summary):
    """train.py tokenises its data with tokenizer_with_gem_tokens before the model loads; the
    engine then adds the tokens to the real tokenizer (add_gem_tokens): the two must agree
    token for token, and the copy must leave the original as it was."""
    from megatron_gem.gem.tokens import tokenizer_with_gem_tokens

    config = GEMConfig(num_special_tokens=3)
    tok = make_tiny_tokenizer()
    before = tok.get_vocab()
    if summary:
        config = GEMConfig(num_special_tokens=3, train_mode="summary")
        assert tokenizer_with_gem_tokens(tok, config) is tok  # summary mode adds no token
        return
    data_tok = tokenizer_with_gem_tokens(tok, config)
    assert data_tok is not tok and tok.get_vocab() == before
    add_gem_tokens(make_tiny_llama(len(tok)), tok, config)
    assert data_tok.get_vocab() == tok.get_vocab() != before
    text = f"a line {config.special_tokens[0]} with a GEM token"
    assert data_tok(text)["input_ids"] == tok(text)["input_ids"]
    # A tokenizer that already carries the tokens (a GEM checkpoint) is used as it is.
    assert tokenizer_with_gem_tokens(tok, config) is tok
