"""Summary mode on the HF model (GEMModel): only the adapter and the logit scale train, plain
text is the base model bit for bit, and the phase-2 fast path (no-grad prefill + summary step
over the KV cache) equals the full-row forward in embeddings, InfoNCE loss and gradients."""

import pytest
import torch

from megatron_gem.data import ContrastiveDataset, GEMDataLoader, InMemoryCorpus, make_ntp_loader
from megatron_gem.gem import GEMConfig
from megatron_gem.gem.losses import info_nce
from megatron_gem.gem.roles import IGNORE_INDEX, Role
from megatron_gem.gem.summary_step import gather_summary_queries
from megatron_gem.hf.model import GEMModel, param_groups, prepare_gem_lm
from megatron_gem.hf.summary import logits_of
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences
from tests.host_syncs import HostSyncCounter

SUMMARY_TOKENS = ["<unk>", "Ł"]  # K existing tokens of the tiny tokenizer


def summary_model(k, *, positions="special", gradient_checkpointing=False, seed=3, layers=None):
    tok = make_tiny_tokenizer()
    cfg = GEMConfig(num_special_tokens=k, train_mode="summary", summary_tokens=SUMMARY_TOKENS[:k], adapter_rank=4, adapter_positions=positions, p_raw=0.5)
    lm = make_tiny_llama(len(tok), seed=seed, **({} if layers is None else {"num_hidden_layers": layers}))
    base = {n: p.detach().clone() for n, p in lm.state_dict().items()}
    ids = prepare_gem_lm(lm, tok, cfg, gradient_checkpointing=gradient_checkpointing)
    assert ids == tok.convert_tokens_to_ids(SUMMARY_TOKENS[:k]) and len(tok) == lm.get_input_embeddings().weight.shape[0]
    model = GEMModel(lm, cfg)
    torch.manual_seed(seed)
    for d in model.adapter.deltas.values():  # B != 0, so the deltas change the summary states
        torch.nn.init.normal_(d.lora_B, std=0.2)
    lm.train()
    return tok, cfg, model, base


def contrastive_batch(tok, cfg, texts=7, rows=6):
    corpus = InMemoryCorpus.from_texts(sample_sentences(40, seed=4), tok)
    ds = ContrastiveDataset(corpus, cfg, max_text_len=20, seq_length=64, pad_id=tok.pad_token_id, num_rows=rows)
    return next(iter(GEMDataLoader(ds, micro_batch_size=texts, data_parallel_rank=0, data_parallel_size=1)))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_adapter_and_logit_scale_train_and_tokens_are_existing():
    tok, cfg, model, base = summary_model(2)
    names = trainable(model)
    assert names and all(n.startswith(("adapter.deltas.", "logit_scale.")) for n in names)
    assert "logit_scale.log_scale" in names
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(model.lm.state_dict()) == set(base)  # nothing registered inside the base model


# fp64 shows the two paths compute the same function (equal up to 1e-10 of each tensor's
# largest entry); fp32 bounds the noise of the reordered reductions (the summary step's attention
# has other shapes; InfoNCE's scale of 20 amplifies it in the gradients).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-4}


def assert_close(got, want, tol, what=""):
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= tol * max(float(want.abs().max()), 1e-30), f"{what}: max |diff| {err:.3g} > {tol} x max |ref| {float(want.abs().max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("k", [1, 2])
def test_fast_path_equals_full_row_forward(k, dtype):
    tok, cfg, model, _ = summary_model(k)
    model.to(dtype)
    tol = TOLERANCES[dtype]
    batch = contrastive_batch(tok, cfg)
    n = int(batch["num_texts"])
    assert (batch["doc_ids"] < 0).any(), "the batch should hold padding"
    assert len({int(c) for c in ((batch["roles"] == Role.SPECIAL).sum(1))}) > 1, "rows should hold different numbers of summary tokens"

    def run(fast):
        model.zero_grad(set_to_none=True)
        emb = model.embeddings(batch, fast=fast)
        loss = info_nce(emb[:n], emb[n:], model.logit_scale())
        loss.backward()
        return emb.detach(), loss.detach(), {nm: p.grad.clone() for nm, p in model.named_parameters() if p.grad is not None}

    emb_f, loss_f, g_f = run(True)
    emb_r, loss_r, g_r = run(False)
    assert_close(emb_f, emb_r, tol, "embeddings")
    assert_close(loss_f, loss_r, tol, "InfoNCE")
    assert set(g_f) == set(g_r) == trainable(model)
    for name in g_r:
        assert_close(g_f[name], g_r[name], tol, name)
    assert any(g.abs().sum() > 0 for nm, g in g_r.items() if "lora_A" in nm)
    # the summary step's queries: every summary token of every row, padding past the row
    q = gather_summary_queries(batch)
    assert int((q["doc_ids"] >= 0).sum()) == int(((batch["roles"] == Role.SPECIAL) & (batch["doc_ids"] >= 0)).sum()) == 2 * n * k


def _embed_and_grads(k, dtype, fast):
    """Embeddings, InfoNCE loss and gradients (as fp64) of the same seeded model in ``dtype``."""
    tok, cfg, model, _ = summary_model(k)
    model.to(dtype)
    batch = contrastive_batch(tok, cfg)
    n = int(batch["num_texts"])
    emb = model.embeddings(batch, fast=fast)
    loss = info_nce(emb[:n], emb[n:], model.logit_scale())
    loss.backward()
    grads = {nm: p.grad.double() for nm, p in model.named_parameters() if p.grad is not None}
    return {"embeddings": emb.detach().double(), "InfoNCE": loss.detach().double(), **grads}


def _rel_err(got, want):
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


@pytest.mark.parametrize("k", [1, 2])
def test_fast_path_in_bf16_is_as_accurate_as_the_full_rows(k):
    # bf16 (what clusters train in): both paths round differently, so neither equals the other;
    # measured against the fp64 full rows, the fast path's error must stay within twice the
    # bf16 full rows' own (+ a floor of bf16's unit roundoff for tensors the full rows got exact).
    ref = _embed_and_grads(k, torch.float64, fast=False)
    fast = _embed_and_grads(k, torch.bfloat16, fast=True)
    full = _embed_and_grads(k, torch.bfloat16, fast=False)
    assert set(fast) == set(full) == set(ref) and len(ref) > 2
    for name, want in ref.items():
        e_fast, e_full = _rel_err(fast[name], want), _rel_err(full[name], want)
        assert e_fast <= 2 * e_full + 2**-8, f"{name}: bf16 fast path error {e_fast:.3g} vs full rows {e_full:.3g}"
    # bf16 on this tiny random model (B ~ N(0, 0.2)) is coarse per tensor (up to ~0.5 of a
    # tensor's largest entry), yet the whole gradient points where the fp64 one does (measured
    # cosine 0.999 for K=1, 0.975 for K=2).
    grads = [n for n in ref if n not in ("embeddings", "InfoNCE")]
    cos = torch.nn.functional.cosine_similarity(torch.cat([fast[n].flatten() for n in grads]), torch.cat([ref[n].flatten() for n in grads]), dim=0)
    assert cos > 0.95, float(cos)


def test_fast_path_under_gradient_checkpointing_equals_reference():
    # transformers drops the cache of a checkpointed layer; the summary step runs without recomputation.
    tok, cfg, model, _ = summary_model(2, gradient_checkpointing=True)
    model.to(torch.float64)
    tol = TOLERANCES[torch.float64]
    batch = contrastive_batch(tok, cfg)
    n = int(batch["num_texts"])
    out = {}
    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        emb = model.embeddings(batch, fast=fast)
        info_nce(emb[:n], emb[n:], model.logit_scale()).backward()
        out[fast] = (emb.detach(), {nm: p.grad.clone() for nm, p in model.named_parameters() if p.grad is not None})
    assert_close(out[True][0], out[False][0], tol, "embeddings")
    assert set(out[True][1]) == set(out[False][1]) == trainable(model)
    for name, g in out[False][1].items():
        assert_close(out[True][1][name], g, tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_text_is_the_base_model_and_ntp_trains_only_adapter_targets(dtype):
    tok, cfg, model, base = summary_model(1)
    reference = make_tiny_llama(len(tok), seed=3)
    prepare_gem_lm(reference, tok, GEMConfig(train_mode="summary", summary_tokens=SUMMARY_TOKENS[:1]))
    model.to(dtype), reference.to(dtype)
    base = {k: v.to(dtype) for k, v in base.items()}
    text = torch.tensor([tok("The cat runs under the old tree.")["input_ids"]])
    assert torch.equal(logits_of(model.lm, text), logits_of(reference, text))  # B != 0: the deltas exist, and act nowhere here
    corpus = InMemoryCorpus.from_texts(sample_sentences(60, seed=9), tok)
    batch = next(iter(make_ntp_loader(corpus, cfg, 96, micro_batch_size=2, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1)))
    trained = batch["labels"] != IGNORE_INDEX
    assert trained.any() and not (trained & (batch["roles"] == Role.PREFIX)).any()  # prefix predictions depend on nothing trainable
    model(batch, "ntp").float().logsumexp(-1)[trained].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(torch.equal(v, base[k]) for k, v in model.lm.state_dict().items())


def test_forward_without_summary_tokens_still_touches_every_trainable_parameter():
    tok, cfg, model, _ = summary_model(1)
    ids = torch.tensor([tok("The cat runs.")["input_ids"]])
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "doc_ids": torch.zeros_like(ids), "roles": torch.zeros_like(ids)}
    model(batch, "ntp").sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()) and all(float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith("adapter."))


def test_recomputation_sees_each_forwards_own_rows():
    # One step of phase 2 with alpha < 1: an NTP forward, then a contrastive forward, then one
    # backward. Recomputing the NTP layers must use the NTP batch's rows, not the last forward's.
    grads = {}
    for ckpt in (False, True):
        tok, cfg, model, _ = summary_model(2, gradient_checkpointing=ckpt)
        model.to(torch.float64)
        corpus = InMemoryCorpus.from_texts(sample_sentences(60, seed=9), tok)
        ntp = next(iter(make_ntp_loader(corpus, cfg, 96, micro_batch_size=2, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1)))
        cl = contrastive_batch(tok, cfg)
        n = int(cl["num_texts"])
        loss = model(ntp, "ntp").logsumexp(-1)[ntp["labels"] != IGNORE_INDEX].mean()
        emb, scale = model(cl, "embed")
        (loss + info_nce(emb[:n], emb[n:], scale)).backward()
        grads[ckpt] = {nm: p.grad.clone() for nm, p in model.named_parameters() if p.grad is not None}
    assert set(grads[True]) == set(grads[False])
    for name, g in grads[False].items():
        assert_close(grads[True][name], g, TOLERANCES[torch.float64], name)


SUMMARY_FILES = ("gem/adapter.py", "hf/summary.py")


def _ntp_batch(tok, cfg):
    corpus = InMemoryCorpus.from_texts(sample_sentences(60, seed=9), tok)
    return next(iter(make_ntp_loader(corpus, cfg, 96, micro_batch_size=2, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1)))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "recompute"])
def test_adapter_syncs_once_per_forward_and_writes_into_the_layer_outputs(checkpointing):
    # The deltas find their rows once per batch (one nonzero) and add by index into each
    # adapted linear's own output: the syncs of a training step (forward, backward and, with
    # activation recomputation, the recomputed layers) do not grow with the number of layers.
    totals, fast_totals = {}, {}
    for layers in (1, 2, 3):
        tok, cfg, model, _ = summary_model(2, gradient_checkpointing=checkpointing, layers=layers)
        ntp, cl = _ntp_batch(tok, cfg), contrastive_batch(tok, cfg)
        assert ((ntp["roles"] == Role.SPECIAL) & (ntp["doc_ids"] >= 0)).any()
        seen, written = {}, []
        modules = dict(model.lm.named_modules())
        for name in model.adapter.names:  # one hook before the adapter's, one after it
            modules[name].register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, (out, out.detach().clone())), prepend=True)
            modules[name].register_forward_hook(lambda m, a, out, n=name: written.append((out, *seen[n])))
        with HostSyncCounter() as syncs:
            logits = model(ntp, "ntp")
            logits.float().logsumexp(-1)[ntp["labels"] != IGNORE_INDEX].sum().backward()
        assert syncs.from_files(*SUMMARY_FILES) == 1 and syncs.ops["aten::nonzero"] == 1, (layers, syncs.ops, syncs.origins)
        totals[layers] = syncs.total
        assert len(written) >= 7 * layers
        for out, base_out, before in written:
            assert out is base_out  # the delta went into the base layer's output: no copy of it
            changed = (out.detach() != before).any(-1)
            assert changed.any() and not (changed & ~((ntp["roles"] == Role.SPECIAL) & (ntp["doc_ids"] >= 0))).any()
        with HostSyncCounter() as syncs:  # the phase-2 fast path: its per-batch syncs, none per layer
            emb, scale = model(cl, "embed")
            n = int(cl["num_texts"])
            info_nce(emb[:n], emb[n:], scale).backward()
        fast_totals[layers] = (syncs.total, syncs.ops["aten::nonzero"])
    assert len(set(totals.values())) == 1, totals
    assert len(set(fast_totals.values())) == 1 and fast_totals[1][1] <= 2, fast_totals


def test_fast_path_of_a_sliding_window_model_with_rows_longer_than_the_window():
    """Mistral's window (16 here) shorter than the packed rows (64): the prefill's cache keeps every
    key of the row (a sliding-window cache layer would keep only the last window and the summary
    step's key metadata would no longer match it), and the fast path equals the full rows."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = make_tiny_tokenizer()
    cfg = GEMConfig(num_special_tokens=1, train_mode="summary", summary_tokens=SUMMARY_TOKENS[:1], adapter_rank=4, p_raw=0.5)
    torch.manual_seed(5)
    mcfg = MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=16
    )
    lm = MistralForCausalLM(mcfg).double()
    prepare_gem_lm(lm, tok, cfg)
    model = GEMModel(lm, cfg)
    for d in model.adapter.deltas.values():
        torch.nn.init.normal_(d.lora_B, std=0.2)
    batch = contrastive_batch(tok, cfg)
    assert batch["input_ids"].shape[1] > mcfg.sliding_window
    with torch.no_grad():
        assert_close(model.embeddings(batch, fast=True), model.embeddings(batch, fast=False), TOLERANCES[torch.float64], "embeddings")
