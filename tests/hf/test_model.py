"""The model path train.py runs equals the dense-mask reference, on batches from the data pipeline."""

import pytest
import torch

from megatron_gem.data import ContrastiveDataset, GEMDataLoader, InMemoryCorpus, make_ntp_loader
from megatron_gem.gem import GEMConfig, gem_mask
from megatron_gem.gem.readout import pool_special_states
from megatron_gem.hf.model import GEMModel, prepare_gem_lm
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences


@pytest.fixture
def setup():
    tok = make_tiny_tokenizer()
    cfg = GEMConfig(num_special_tokens=2, p_raw=0.3)
    lm = make_tiny_llama(len(tok), seed=3)
    prepare_gem_lm(lm, tok, cfg, backend="auto", gradient_checkpointing=False)
    corpus = InMemoryCorpus.from_texts(sample_sentences(60, seed=9), tok)
    return tok, cfg, lm, corpus


def reference_hidden(lm, batch):
    """Stock eager attention given the dense GEM mask as a prepared 4-D mask."""
    lm.set_attn_implementation("eager")
    try:
        mask = gem_mask(batch["doc_ids"], batch["roles"])[:, None]
        additive = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
        return lm.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=additive).last_hidden_state
    finally:
        lm.set_attn_implementation("gem")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ntp_forward_and_gradients_equal_reference(setup):
    tok, cfg, lm, corpus = setup
    batch = next(iter(make_ntp_loader(corpus, cfg, 96, micro_batch_size=2, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1)))
    assert (batch["roles"] == 1).any(), "the batch should hold GEM layouts"
    model = GEMModel(lm, cfg)
    logits = model(batch, "ntp")
    logits.square().mean().backward()
    got = grads(model)
    model.zero_grad()
    ref = lm.get_output_embeddings()(reference_hidden(lm, batch))
    ref.square().mean().backward()
    want = grads(model)
    assert torch.allclose(logits, ref, atol=1e-5)
    for name in want:
        if name.startswith("logit_scale"):
            continue
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_contrastive_forward_equals_reference(setup):
    tok, cfg, lm, corpus = setup
    ds = ContrastiveDataset(corpus, cfg, max_text_len=24, seq_length=96, pad_id=tok.pad_token_id)
    batch = next(iter(GEMDataLoader(ds, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1)))
    model = GEMModel(lm, cfg)
    emb, scale = model(batch, "embed")
    ref = pool_special_states(reference_hidden(lm, batch), batch["roles"], batch["doc_ids"], 8)
    assert emb.shape == (8, lm.config.hidden_size)
    assert torch.allclose(emb, ref, atol=1e-5)
    assert scale.item() == pytest.approx(cfg.logit_scale_init)
