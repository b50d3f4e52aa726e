"""The Triton GEM kernel (forward and backward) against a plain-PyTorch reference.

Runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors. Error bounds follow
flash-attention's tests: the kernel's error against a high-precision reference (fp32 for fp16 /
bf16 inputs, fp64 for fp32 inputs) must stay within twice the error of the same reference
computed in the input precision, plus a small absolute slack.
"""

import math

import pytest
import torch

from megatron_gem.gem.mask import gem_mask
from megatron_gem.kernels import build_block_table, triton_gem_attention
from megatron_gem.kernels.reference import PRECISION, error_report, make_inputs, random_batch, reference_attention, run_with_grads


def check_against_reference(doc, role, *, Hq, Hkv, D, dtype, block_m, block_n, bos=False, seed=0, scale=None):
    B, L = doc.shape
    q, k, v, do = make_inputs(seed, B, Hq, Hkv, L, D, dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = gem_mask(doc, role, suffix_sees_bos=bos)
    hi, _ = PRECISION[dtype]

    tri = run_with_grads(
        lambda q, k, v: triton_gem_attention(q, k, v, doc, role, scale=scale, suffix_sees_bos=bos, block_m=block_m, block_n=block_n),
        q,
        k,
        v,
        do,
    )
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, scale, hi), q, k, v, do.to(hi))
    low = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, scale, dtype), q, k, v, do)

    for name, t, r, lo in zip(("out", "dq", "dk", "dv"), tri, ref, low):
        assert t.dtype == dtype and t.shape == r.shape, name
        rep = error_report(t, r, lo, dtype)
        assert rep["finite"], f"{name} has NaN/inf"
        assert rep["ok"], f"{name}: kernel error {rep['err']:.3g} > bound {rep['bound']:.3g} (reference in {dtype}: {rep['ref_err']:.3g})"
    return tri


# (style of row 0, style of row 1, L, K, Hq, Hkv, block_m, block_n)
LAYOUTS = [
    ("mixed", "straddle", 100, 1, 4, 4, 16, 16),
    ("straddle", "tiny", 77, 2, 4, 2, 16, 16),
    ("mixed", "plain", 131, 5, 4, 1, 16, 16),
    ("long", "straddle", 90, 10, 4, 2, 16, 16),
    ("straddle", "mixed", 113, 5, 2, 2, 32, 16),
    ("tiny", "long", 64, 1, 4, 4, 16, 32),
    ("chaos", "mixed", 70, 2, 4, 2, 16, 16),
]


def _fp16_too(layout) -> bool:
    """Every layout in fp32 (the mask cases); fp16 on three of them (grouped heads with 5 summary
    tokens, K=10, 32-row tiles): the rounding paths, without doubling the interpreter time."""
    return layout[3] >= 5


# make test keeps one interpreter run per thing a layout can break: every row style, K of 1, 2,
# 5 and 10, GQA groups of 1, 2 and 4, 16x16, 32x16 and 16x32 tiles, and fp16's rounding once
# (K=10 with grouped heads); the rest of the grid (the same mask cases again) is make test-long's.
LONG_CASES = {(LAYOUTS[0], torch.float32), (LAYOUTS[3], torch.float32), (LAYOUTS[2], torch.float16), (LAYOUTS[4], torch.float16)}


def _cases():
    cases = [(c, torch.float32) for c in LAYOUTS] + [(c, torch.float16) for c in LAYOUTS if _fp16_too(c)]
    return [pytest.param(c, d, marks=pytest.mark.long) if (c, d) in LONG_CASES else (c, d) for c, d in cases]


@pytest.mark.parametrize(
    "layout, dtype",
    _cases(),
    ids=lambda x: f"{x[0]}-{x[1]}-L{x[2]}-K{x[3]}-gqa{x[4] // x[5]}-b{x[6]}x{x[7]}" if isinstance(x, tuple) else str(x).replace("torch.", ""),
)
def test_matches_reference(layout, dtype):
    s0, s1, L, K, Hq, Hkv, bm, bn = layout
    doc, role = random_batch(L * 31 + K, 2, L, K, styles=(s0, s1), block=bm)
    check_against_reference(doc, role, Hq=Hq, Hkv=Hkv, D=32, dtype=dtype, block_m=bm, block_n=bn, seed=K)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.long)])  # fp16 rounding: test_matches_reference
def test_suffix_sees_bos(dtype):
    doc, role = random_batch(7, 2, 96, 2, styles=("straddle", "mixed"))
    check_against_reference(doc, role, Hq=4, Hkv=2, D=32, dtype=dtype, block_m=16, block_n=16, bos=True)


@pytest.mark.parametrize("D", [16, 64, 128, 48])
def test_head_dims(D):
    """Powers of two 16..128, and a non-power of two (padded to 64 with masked loads)."""
    doc, role = random_batch(D, 1, 50, 2, styles=("straddle",))
    check_against_reference(doc, role, Hq=2, Hkv=1, D=D, dtype=torch.float32, block_m=16, block_n=16)


@pytest.mark.parametrize("styles,bos", [(("straddle",), False), (("chaos", "straddle"), True)], ids=["straddle", "chaos-bos"])
def test_bf16(styles, bos):
    """bf16 (the interpreter rounds P, dS and the outputs to nearest even as GPUs do: with its
    own truncating cast, the chaos layout's dq error was 0.031 against the bf16 reference's 0.008)."""
    doc, role = random_batch(11, len(styles), 70, 2, styles=styles)
    check_against_reference(doc, role, Hq=2, Hkv=1, D=16, dtype=torch.bfloat16, block_m=16, block_n=16, bos=bos)


def test_default_blocks_and_scale():
    """Launcher defaults (interpreter tiles), a custom scale, one long document plus padding."""
    doc, role = random_batch(5, 1, 70, 1, styles=("long",))
    check_against_reference(doc, role, Hq=2, Hkv=2, D=32, dtype=torch.float32, block_m=None, block_n=None, scale=0.3)


def test_one_token_documents_no_nan():
    """Every token its own document: each row sees only itself, so out == v (per kv head)."""
    L = 40
    doc = torch.arange(L)[None]
    role = torch.tensor([0, 1, 2] * 13 + [1])[None]
    q, k, v, do = make_inputs(0, 1, 4, 2, L, 32, torch.float32)
    out = triton_gem_attention(q, k, v, doc, role, block_m=16, block_n=16)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), rtol=0, atol=1e-6)


def test_non_contiguous_inputs():
    """q/k/v as views of a [B, L, H, D] layout (what HF projections produce)."""
    B, L, Hq, Hkv, D = 2, 48, 4, 2, 32
    doc, role = random_batch(3, B, L, 2, styles=("straddle", "mixed"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2)
    do = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    mask = gem_mask(doc, role)
    tri = run_with_grads(lambda q, k, v: triton_gem_attention(q, k, v, doc, role, block_m=16, block_n=16), q, k, v, do)
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, D**-0.5, torch.float64), q, k, v, do.double())
    for t, r in zip(tri, ref):
        torch.testing.assert_close(t.double(), r.double(), rtol=1e-5, atol=1e-5)


def test_block_table_reuse_and_mismatch():
    doc, role = random_batch(2, 1, 40, 1, styles=("mixed",))
    q, k, v, _ = make_inputs(0, 1, 2, 2, 40, 16, torch.float32)
    table = build_block_table(doc, role, block_m=16, block_n=16)
    a = triton_gem_attention(q, k, v, doc, role, block_table=table)
    b = triton_gem_attention(q, k, v, doc, role, block_m=16, block_n=16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another length, tiling or suffix_sees_bos"):
        triton_gem_attention(q, k, v, doc, role, block_table=table, suffix_sees_bos=True)


def test_rejects_bad_inputs():
    doc = torch.zeros(1, 16, dtype=torch.long)
    q = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="Hkv must divide Hq"):
        triton_gem_attention(q, torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), doc, doc)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        triton_gem_attention(q, q.double(), q, doc, doc)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        triton_gem_attention(q, q, q, doc[:, :8], doc[:, :8])
