"""Sliding windows (Mistral's config.sliding_window) in every backend, against a brute-force
oracle written here pair by pair, and against transformers' own Mistral attention."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask  # noqa: F401  (imported early: flex's vmap)

from megatron_gem import gem_attention
from megatron_gem.attention.cached import gem_attention_over_cache
from megatron_gem.gem.roles import Role
from megatron_gem.kernels.reference import make_inputs, random_batch, reference_attention, run_with_grads

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def oracle_mask(doc, role, window, suffix_sees_bos=False):
    """[B, L, L]: query q sees key k iff same document, k <= q, q - k < window, the suffix does
    not see the prefix (the document's first token excepted with suffix_sees_bos), special
    tokens do not see each other."""
    B, L = doc.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        d, r = doc[b].tolist(), role[b].tolist()
        for q in range(L):
            for k in range(q + 1):
                if d[q] != d[k] or q - k >= window:
                    continue
                start = k == 0 or d[k - 1] != d[k]
                if r[q] == X and r[k] == P and not (suffix_sees_bos and start):
                    continue
                if r[q] == S and r[k] == S and q != k:
                    continue
                out[b, q, k] = True
    return out


# (seed, L, K, window, suffix_sees_bos): windows shorter than a document, across block edges,
# one token (each token sees only itself), longer than the row
CASES = [(0, 83, 2, 7, False), (1, 83, 5, 20, True), (2, 64, 1, 1, False), (3, 83, 2, 200, True)]
# The Triton interpreter on the window longer than the row (the unwindowed kernel, which
# test_triton_gem_attention checks): make test-long; the cheap sdpa backend runs every case.
TRITON_CASES = CASES[:3] + [pytest.param(*CASES[3], marks=pytest.mark.long)]


@pytest.mark.parametrize("seed,L,K,window,bos", TRITON_CASES)
def test_triton_with_window_matches_oracle(seed, L, K, window, bos):
    doc, role = random_batch(seed, 2, L, K, styles=("long", "straddle"), block=16)
    q, k, v, do = make_inputs(seed, 2, 2, 1, L, 16, torch.float32)
    mask = oracle_mask(doc, role, window, bos)
    got = run_with_grads(lambda q, k, v: gem_attention(q, k, v, doc, role, backend="triton", sliding_window=window, suffix_sees_bos=bos), q, k, v, do)
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, 16**-0.5, torch.float64), q, k, v, do.double())
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("seed,L,K,window,bos", CASES)
def test_sdpa_with_window_matches_oracle(seed, L, K, window, bos):
    doc, role = random_batch(seed, 2, L, K, styles=("long", "straddle"), block=16)
    q, k, v, do = make_inputs(seed, 2, 4, 2, L, 16, torch.float32)
    mask = oracle_mask(doc, role, window, bos)
    got = run_with_grads(lambda q, k, v: gem_attention(q, k, v, doc, role, backend="sdpa", sliding_window=window, suffix_sees_bos=bos), q, k, v, do)
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, 16**-0.5, torch.float64), q, k, v, do.double())
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_one_plain_document_with_window_is_not_run_causal():
    """One plain document longer than the window: not the causal fast path (the window binds)."""
    L, W = 40, 8
    doc, role = torch.zeros(1, L, dtype=torch.long), torch.zeros(1, L, dtype=torch.long)
    q, k, v, _ = make_inputs(0, 1, 2, 2, L, 8, torch.float32)
    got = gem_attention(q, k, v, doc, role, backend="sdpa", sliding_window=W)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, oracle_mask(doc, role, W), 8**-0.5, torch.float64), rtol=1e-5, atol=1e-5)


def test_flex_with_window_matches_oracle(monkeypatch):
    """Compiled flex (forced for this small CPU shape), forward (no FlexAttention backward on
    CPU); the shape of test_backends_agree's GQA case, so the compiled graph is shared."""
    from megatron_gem.attention import dispatch

    monkeypatch.setattr(dispatch, "FLEX_CPU_EAGER_MAX_BYTES", 0)
    for seed, window, bos in ((0, 9, False), (1, 30, True)):
        doc, role = random_batch(seed, 2, 83, 2, styles=("long", "straddle"))
        q, k, v, _ = make_inputs(seed, 2, 4, 2, 83, 32, torch.float32)
        got = gem_attention(q, k, v, doc, role, backend="flex", sliding_window=window, suffix_sees_bos=bos)
        ref = reference_attention(q, k, v, oracle_mask(doc, role, window, bos), 32**-0.5, torch.float64)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_cached_attention_with_window_matches_oracle():
    """Queries = some positions of the row (e.g. the summary step), keys = the whole row."""
    doc, role = random_batch(4, 1, 60, 2, styles=("straddle",))
    q_all, k, v, _ = make_inputs(4, 1, 2, 1, 60, 8, torch.float32)
    pick = torch.tensor([[5, 17, 33, 34, 59]])
    starts = torch.tensor([[i == 0 or doc[0, i - 1] != doc[0, i] for i in range(60)]])
    for window, bos in ((6, False), (25, True)):
        got = gem_attention_over_cache(
            q_all[:, :, pick[0]],
            k,
            v,
            q_doc=doc.gather(1, pick),
            q_role=role.gather(1, pick),
            q_index=pick,
            k_doc=doc,
            k_role=role,
            k_index=torch.arange(60)[None],
            k_is_doc_start=starts,
            suffix_sees_bos=bos,
            sliding_window=window,
        )
        full = reference_attention(q_all, k, v, oracle_mask(doc, role, window, bos), 8**-0.5, torch.float64)
        torch.testing.assert_close(got.double(), full[:, :, pick[0]], rtol=1e-5, atol=1e-5)


def _tiny_mistral(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        use_cache=False,
    )
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_hf_mistral_window_equals_transformers(backend):
    """A tiny Mistral with sliding_window=6 on one plain row of 40 tokens: the GEM adapter (GEM
    metadata of one plain document, and the causal fallback without metadata) gives
    transformers' own sliding-window attention's logits. Both differ from the windowless model."""
    from megatron_gem.attention.hf import use_gem_attention

    model = _tiny_mistral(6)
    ids = torch.randint(0, 120, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        model.config.sliding_window = None
        windowless = model(ids).logits
        model.config.sliding_window = 6
        use_gem_attention(model, backend=backend)
        doc = torch.zeros_like(ids)
        got = model(ids, doc_ids=doc, roles=torch.zeros_like(ids), position_ids=torch.arange(40)[None]).logits
        fallback = model(ids).logits
    assert (ref - windowless).abs().max() > 1e-3, "the window must matter at this length"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fallback, ref, rtol=1e-4, atol=1e-5)
