"""attention/dispatch.py: the sdpa causal fast path, the dense path's memory refusal, auto's
choice, and the per-batch caches (one build per batch across layers, recompute and
megatron-core's fresh views)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_gem import gem_attention
from megatron_gem.attention import dispatch
from megatron_gem.attention.batch_cache import block_tables, causal_layouts, dense_masks, flex_block_masks
from megatron_gem.attention.megatron import gem_mask_info, split_mask_info
from megatron_gem.gem.roles import PAD_DOC_ID, Role
from megatron_gem.kernels.reference import STYLES, random_batch

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def _qkv(B, Hq, Hkv, L, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).requires_grad_(requires_grad) for h in (Hq, Hkv, Hkv)]


def _brute_is_causal(doc, role):
    """Every row's GEM mask, read pair by pair, is the causal triangle (independent of mask.py)."""
    for d, r in zip(doc.tolist(), role.tolist()):
        for q in range(len(d)):
            for k in range(q):
                if d[q] != d[k] or (r[q] == X and r[k] == P) or (r[q] == S and r[k] == S):
                    return False
    return True


class SdpaSpy:
    """Records whether each SDPA call ran is_causal or with a mask."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(*a, **kw):
            self.calls.append("causal" if kw.get("is_causal") else ("mask" if kw.get("attn_mask") is not None else "none"))
            return real(*a, **kw)

        monkeypatch.setattr(dispatch.F, "scaled_dot_product_attention", spy)


def _causal_rows():
    L = 40
    plain = torch.zeros(2, L, dtype=torch.long)
    embed = plain.clone()
    embed[:, -1] = S  # text SPECIAL, K = 1
    return {"plain": (torch.zeros(2, L, dtype=torch.long), plain), "text_special": (torch.tensor([[3] * L, [9] * L]), embed)}


@pytest.mark.parametrize("name", ["plain", "text_special"])
def test_causal_fast_path_equals_dense_reference(name, monkeypatch):
    """Outputs and gradients of is_causal SDPA equal the dense GEM mask's, for GQA too."""
    doc, role = _causal_rows()[name]
    assert _brute_is_causal(doc, role)
    spy = SdpaSpy(monkeypatch)
    do = torch.randn(2, 4, doc.shape[1], 16, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (dispatch.sdpa_gem_attention, dispatch.dense_gem_attention):
        q, k, v = _qkv(2, 4, 2, doc.shape[1], 16, requires_grad=True)
        out = fn(q, k, v, doc, role, scale=0.3)
        out.backward(do)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    assert spy.calls == ["causal", "mask"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_causal_fast_path_never_taken_for_a_gem_layout(monkeypatch):
    """Over random packed layouts (and single rows of them) SDPA runs is_causal exactly when the
    brute-force mask is the causal triangle; every GEM layout gets the dense mask."""
    spy = SdpaSpy(monkeypatch)
    seen = set()
    for seed, style in enumerate(STYLES * 2):
        doc, role = random_batch(seed, 2, 48, 1 + seed % 3, styles=(style, style))
        for d, r in ((doc, role), (doc[:1], role[:1]), (torch.zeros_like(doc[:1]), role[:1])):
            q, k, v = _qkv(d.shape[0], 2, 2, 48, 8)
            spy.calls.clear()
            gem_attention(q, k, v, d, r, backend="sdpa")
            expected = "causal" if _brute_is_causal(d, r) else "mask"
            assert spy.calls == [expected], (seed, style)
            seen.add(expected)
    assert seen == {"causal", "mask"}


def test_auto_chooses_by_device_and_layout():
    plain_doc, plain_role = _causal_rows()["plain"]
    gem_doc, gem_role = random_batch(1, 2, 40, 2, styles=("mixed", "straddle"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch.choose_backend("auto", cpu, gem_doc, gem_role) == "sdpa"
    assert dispatch.choose_backend("auto", cpu, plain_doc, plain_role) == "sdpa"
    assert dispatch.choose_backend("auto", cuda, gem_doc, gem_role) == "triton"
    assert dispatch.choose_backend("auto", cuda, plain_doc, plain_role) == "sdpa"
    assert dispatch.choose_backend("auto", cuda, plain_doc, plain_role, sliding_window=8) == "triton"  # a window < L is not plain causal
    assert dispatch.choose_backend("flex", cuda, plain_doc, plain_role) == "flex"
    with pytest.raises(ValueError, match="unknown GEM attention backend"):
        dispatch.choose_backend("dense", cpu, plain_doc, plain_role)


def test_dense_path_refuses_what_would_not_fit_on_cuda(monkeypatch):
    """FakeTensorMode with device='cuda' tensors: the check runs as on a GPU, nothing is allocated.
    The device's memory is faked at 80 GiB."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(dispatch, "_device_total_memory", lambda device: 80 * 2**30)
    with FakeTensorMode():
        B, Hq, Hkv, D = 1, 32, 8, 128

        def run(L):
            q = torch.empty(B, Hq, L, D, device="cuda", dtype=torch.bfloat16)
            k = torch.empty(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
            doc = torch.zeros(B, L, dtype=torch.long, device="cuda")
            return gem_attention(q, k, k, doc, doc, backend="sdpa")

        # 32 heads x 8192^2 x 4 bytes = 8 GiB of fp32 scores: under a quarter of 80 GiB
        assert run(8192).shape == (B, Hq, 8192, D)
        # at 16384 it is 32 GiB > 20 GiB: refused, naming the backend to use
        with pytest.raises(ValueError, match=r"32\.0 GiB.*use backend 'triton'"):
            run(16384)
    assert dispatch.DENSE_SCORE_FRACTION == 0.25


def test_dense_path_reads_device_memory_once(monkeypatch):
    calls = []

    class Props:
        total_memory = 10 * 2**30

    monkeypatch.setattr(dispatch, "_device_memory", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: calls.append(index) or Props())
    dev = torch.device("cuda", 0)
    assert dispatch._device_total_memory(dev) == dispatch._device_total_memory(dev) == 10 * 2**30
    assert calls == [0]


# ---------------------------------------------------------------------------------------------
# Per-batch caches
# ---------------------------------------------------------------------------------------------
def _reset():
    for c in (dense_masks, causal_layouts, block_tables, flex_block_masks):
        c.clear()
        c.builds = 0


def _core_attention(backend, n_layers=2):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gem.attention.megatron import GEMCoreAttention

    cfg = TransformerConfig(
        num_layers=n_layers, hidden_size=32, num_attention_heads=2, num_query_groups=1, kv_channels=16, hidden_dropout=0.0, attention_dropout=0.0
    )
    return [GEMCoreAttention(cfg, layer_number=i + 1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self", backend=backend) for i in range(n_layers)]


@pytest.mark.parametrize("backend,cache", [("triton", block_tables), ("sdpa", dense_masks)])
def test_megatron_views_share_one_build_across_layers_and_recompute(backend, cache):
    """megatron-core's core attention gets new views of attention_mask in every layer call, and
    detached copies in the recompute: the table / dense mask is still built once per micro-batch."""
    _reset()
    layers = _core_attention(backend)
    L, B = 40, 1  # small: the triton kernel runs in the interpreter
    doc, role = random_batch(4, B, L, 2, styles=("straddle",))
    info = gem_mask_info(doc, role)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, B, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(L, B, 1, 16, generator=g, requires_grad=True)

    def stack(q, k, info):
        h = q
        for layer in layers:
            h = layer(h, k, k, info).view(L, B, 2, 16)
        return h

    # activation recompute in the backward, re-run on detach()-ed inputs as megatron-core's
    # tensor_parallel.checkpoint does (the reentrant form): new tensor objects, same memory
    out = checkpoint(stack, q, k, info, use_reentrant=True)
    out.square().sum().backward()
    assert cache.builds == 1
    assert causal_layouts.builds == (1 if backend == "sdpa" else 0)
    # the result equals the uncached reference
    ref = stack(q.detach(), k.detach(), gem_mask_info(doc.clone(), role.clone()))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
    assert cache.builds == 2  # a new micro-batch (equal values, a new tensor) builds its own


@pytest.fixture
def compiled_flex(monkeypatch):
    """Force the compiled flex_attention for these small CPU shapes; count its calls."""
    calls = []
    real = dispatch.compiled_flex_attention

    def counting():
        fn = real()
        return lambda *a, **kw: calls.append(1) or fn(*a, **kw)

    monkeypatch.setattr(dispatch, "FLEX_CPU_EAGER_MAX_BYTES", 0)
    monkeypatch.setattr(dispatch, "compiled_flex_attention", counting)
    return calls


@pytest.mark.long  # torch.compile of flex on CPU (a minute); uncompiled flex agrees in make test (test_backends_agree, test_sliding_window)
def test_compiled_flex_equals_sdpa_reference(compiled_flex):
    """Compiled FlexAttention with the block-table BlockMask equals the dense reference
    (forward: no FlexAttention backward on CPU) over layouts, suffix_sees_bos and a window. One
    shape throughout (that of test_backends_agree's GQA case), so one compiled graph."""
    for seed, (styles, bos, window) in enumerate([(("mixed", "straddle"), False, None), (("chaos", "long"), True, None), (("tiny", "plain"), False, 11)]):
        doc, role = random_batch(seed, 2, 83, 1 + seed, styles=styles)
        q, k, v = _qkv(2, 4, 2, 83, 32, seed=seed)
        got = gem_attention(q, k, v, doc, role, backend="flex", suffix_sees_bos=bos, sliding_window=window)
        ref = dispatch.dense_gem_attention(q, k, v, doc, role, scale=32**-0.5, suffix_sees_bos=bos, sliding_window=window)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(compiled_flex) == 3


def test_small_cpu_flex_runs_uncompiled(monkeypatch):
    """Below FLEX_CPU_EAGER_MAX_BYTES of scores a CPU call skips the compiler (same result)."""
    monkeypatch.setattr(dispatch, "compiled_flex_attention", lambda: pytest.fail("compiled for a small CPU call"))
    doc, role = random_batch(2, 1, 40, 2, styles=("straddle",))
    q, k, v = _qkv(1, 2, 1, 40, 16)
    torch.testing.assert_close(gem_attention(q, k, v, doc, role, backend="flex"), dispatch.dense_gem_attention(q, k, v, doc, role), rtol=1e-5, atol=1e-5)


def test_flex_block_mask_built_once_per_batch(compiled_flex):
    """Three layers and a second pass over fresh megatron-style views: one BlockMask."""
    _reset()
    L, B = 83, 2
    doc, role = random_batch(5, B, L, 2, styles=("straddle", "mixed"))
    info = gem_mask_info(doc, role)
    q, k, v = _qkv(B, 4, 2, L, 32)
    outs = []
    for _ in range(2):  # forward, then a recompute-like second pass
        for _layer in range(3):
            d, r = split_mask_info(info)
            outs.append(gem_attention(q, k, v, d, r, backend="flex"))
    assert flex_block_masks.builds == 1
    ref = dispatch.dense_gem_attention(q, k, v, doc, role, scale=32**-0.5)
    for o in outs:
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_cache_follows_edits_and_never_aliases_freed_memory():
    _reset()
    L = 32
    q, k, v = _qkv(1, 2, 2, L, 8)
    doc = torch.zeros(1, L, dtype=torch.long)
    doc[:, 16:] = 1
    role = torch.zeros(1, L, dtype=torch.long)
    info = gem_mask_info(doc, role)
    gem_attention(q, k, v, *split_mask_info(info), backend="sdpa")
    gem_attention(q, k, v, *split_mask_info(info), backend="sdpa")
    assert dense_masks.builds == 1
    info[0, 0, 16:] = 0  # in place: one document now (the version counter moves): rebuilt, and causal
    out = gem_attention(q, k, v, *split_mask_info(info), backend="sdpa")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert causal_layouts.builds == 2
    # batches created and freed in turn (the allocator may hand out the same memory, even the
    # same Python id): every one is derived anew
    for i in range(4):
        d = torch.full((1, L), i, dtype=torch.long)
        d[:, L // 2 :] = PAD_DOC_ID if i % 2 else i + 1
        r = torch.zeros(1, L, dtype=torch.long)
        got = gem_attention(q, k, v, d, r, backend="sdpa")
        torch.testing.assert_close(got, dispatch.dense_gem_attention(q, k, v, d.clone(), r.clone()))
        del d, r
    assert len(dense_masks) <= dense_masks.capacity


def test_hf_gradient_checkpointing_builds_one_mask(tiny_tokenizer):
    """HF Llama with gradient checkpointing: every layer's forward and recompute share one mask
    (the sdpa backend's dense mask; the triton table uses the same cache, tested above)."""
    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.testing import make_tiny_llama
    from tests.attention.test_hf_adapter import packed_batch

    _reset()
    model = make_tiny_llama(len(tiny_tokenizer))
    use_gem_attention(model, backend="sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = packed_batch(tiny_tokenizer)
    calls = []
    for layer in model.model.layers:  # count attention forwards: the test must see the recompute
        layer.self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    model(**batch).logits.square().mean().backward()
    assert len(calls) == 2 * len(model.model.layers), "gradient checkpointing re-ran every attention"
    assert dense_masks.builds == 1 and causal_layouts.builds == 1
