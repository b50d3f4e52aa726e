"""GEMModel's next-token loss without full logits (task "ntp_losses", hf/head_loss.py) equals the
cross-entropy of its logits, gradients included, with untied and tied (Llama-3.2) embeddings;
and full mode's vocabulary padding (gem.tokens.pad_vocab_rows): padding rows never win a
softmax, the loss is the unpadded one, the export drops them."""

import pytest
import torch

from megatron_gem.data import InMemoryCorpus, make_ntp_loader
from megatron_gem.gem import IGNORE_INDEX, GEMConfig
from megatron_gem.gem.tokens import VOCAB_ROW_MULTIPLE, embedding_rows, pad_vocab_rows
from megatron_gem.hf.model import GEMModel, prepare_gem_lm
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences


def gem_lm(tied: bool, seed: int = 3):
    tok = make_tiny_tokenizer()
    cfg = GEMConfig(num_special_tokens=2, p_raw=0.3)
    lm = make_tiny_llama(len(tok), tie_word_embeddings=tied, seed=seed)
    prepare_gem_lm(lm, tok, cfg, backend="sdpa")
    corpus = InMemoryCorpus.from_texts(sample_sentences(60, seed=9), tok)
    batch = next(iter(make_ntp_loader(corpus, cfg, 96, micro_batch_size=2, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1)))
    return tok, cfg, lm, batch


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def reference_losses(model, batch):
    """Today's composition: the logits, upcast, per-token cross-entropy."""
    logits = model(batch, "ntp")
    flat = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(batch["labels"].shape)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ntp_losses_equal_the_logits_cross_entropy_with_gradients(tied):
    tok, cfg, lm, batch = gem_lm(tied)
    model = GEMModel(lm, cfg)
    model.head_losses.chunk_tokens, model.head_losses.chunk_vocab = 29, 50  # several blocks, none dividing
    assert (batch["labels"] == IGNORE_INDEX).any() and (batch["roles"] == 1).any()
    g = torch.Generator().manual_seed(0)
    upstream = torch.rand(batch["labels"].shape, generator=g)
    got = model(batch, "ntp_losses")
    (got * upstream).sum().backward()
    got_grads = grads(model)
    want = reference_losses(model, batch)
    (want * upstream).sum().backward()
    want_grads = grads(model)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert set(got_grads) == set(want_grads)
    head = lm.get_output_embeddings().weight
    assert (head is lm.get_input_embeddings().weight) == tied
    for name, w in want_grads.items():  # fp32 sums in another order: relative to the gradient's scale
        err, scale = float((got_grads[name] - w).abs().max()), float(w.abs().max())
        assert err <= 1e-5 * max(scale, 1e-3), (name, err, scale)
    # The tied matrix gets its head gradient (every row; the input side only on looked-up ids).
    emb_name = next(n for n, p in model.named_parameters() if p is lm.get_input_embeddings().weight)
    touched = torch.zeros(head.shape[0], dtype=torch.bool)
    touched[batch["input_ids"].flatten()] = True
    assert got_grads[emb_name][~touched].abs().sum() > 0 if tied else not got_grads[emb_name][~touched].any()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_padding_rows_never_win_and_the_loss_is_the_unpadded_one(tied, tmp_path):
    tok, cfg, lm, batch = gem_lm(tied)
    unpadded = GEMModel(lm, cfg)
    want = unpadded(batch, "ntp_losses").detach()
    rows = embedding_rows(lm)
    assert rows == len(tok) and rows % VOCAB_ROW_MULTIPLE != 0, "the tiny vocabulary must need padding"
    assert pad_vocab_rows(lm) == rows
    padded_rows = embedding_rows(lm)
    assert padded_rows % VOCAB_ROW_MULTIPLE == 0 and rows < padded_rows < rows + VOCAB_ROW_MULTIPLE
    assert pad_vocab_rows(lm) == padded_rows  # a multiple already: nothing to do
    head = lm.get_output_embeddings().weight
    assert head.shape[0] == padded_rows and not head[rows:].any() and not lm.get_input_embeddings().weight[rows:].any()
    with torch.no_grad():  # adversarial padding rows: they would win every softmax if they counted
        head[rows:] = 50.0 * head[:rows].abs().max()
    model = GEMModel(lm, cfg, vocab_size=rows)
    assert torch.allclose(model(batch, "ntp_losses"), want, atol=1e-5)
    logits = model(batch, "ntp")
    assert logits.shape[-1] == padded_rows and torch.all(logits[..., rows:] == float("-inf"))
    assert int(logits.argmax(-1).max()) < rows
    draws = torch.multinomial(torch.softmax(logits.flatten(0, 1).float(), -1), 64, replacement=True, generator=torch.Generator().manual_seed(0))
    assert int(draws.max()) < rows

    # The export has exactly the tokenizer's rows, as a plain HF model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.hf.export import export_hf

    export_hf(lm, tok, cfg, str(tmp_path / "hf"), vocab_size=rows)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert back.config.vocab_size == rows == len(AutoTokenizer.from_pretrained(tmp_path / "hf")) and lm.config.vocab_size == padded_rows
    assert torch.equal(back.get_input_embeddings().weight, lm.get_input_embeddings().weight[:rows])
    assert torch.equal(back.get_output_embeddings().weight, head[:rows])
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tied


def test_summary_mode_adds_no_rows():
    tok = make_tiny_tokenizer()
    lm = make_tiny_llama(len(tok), seed=1)
    rows = embedding_rows(lm)
    prepare_gem_lm(lm, tok, GEMConfig(train_mode="summary", summary_tokens=["<unk>"]), backend="sdpa")
    assert embedding_rows(lm) == rows == len(tok)
