"""Block-sparse GEM attention in Triton: forward, backward, launchers, torch.library custom ops.

Design
  FlashAttention-2 (Dao, 2023) tiling with an online softmax in base 2, the log-sum-exp saved
  by the forward, and a backward in two passes without atomics: one program per key block
  accumulates dK and dV over the query blocks that see it (all query heads of its GQA group, so
  repeated K/V are never materialised), one program per query block accumulates dQ. The pair
  "which tiles, and which of them need the mask" comes from FlexAttention's BlockMask idea
  (two lists per query block: PARTIAL and FULL key blocks, plus the transposed lists for dK/dV),
  computed for GEM by ``kernels/block_table.py`` from per-block summaries of doc_ids and roles.
  EMPTY tiles are never visited. FULL tiles run with no mask at all. In PARTIAL tiles the rule
  is evaluated per element from per-token doc_id / role loads (``_gem_allowed``, a line-by-line
  mirror of megatron_gem.gem.mask.allowed, the sliding window included: WINDOW is the model's
  window, or L without one); no dense mask exists anywhere.
  The launchers are registered as the custom ops ``megatron_gem::gem_attention_fwd`` / ``_bwd``
  with fake implementations and an autograd formula: torch.compile treats them as opaque
  operators (no graph break) and FakeTensorMode gets outputs and gradients without a launch.
  Inputs fp16 / bf16 (fp32 accumulation, P and dS rounded to the input type before their
  matmuls, as FlashAttention does) or fp32 (IEEE dots, for tests). Head dims up to 256 are
  accepted (padded to the next power of two with masked loads; 16, 32, 48, 64, 128 tested in
  the interpreter, 64 and 128 compiled for GPUs); any L (the row tail past L is masked by
  bounds in PARTIAL tiles; tiles cut by L are never FULL).

What is tested (tests/kernels, under TRITON_INTERPRET=1 on CPU)
  Outputs and dQ/dK/dV against a plain-PyTorch reference in fp32/fp64, error bounded by twice
  the error of the same reference computed in the input precision (flash-attention's test
  style), over random packed layouts: K in {1, 2, 5, 10}, one-token documents, special runs
  straddling block edges, all-plain rows, one long document, padding tails, L not a multiple
  of the block, GQA ratios 1/2/4, rows of different layouts in one batch, suffix_sees_bos on
  and off, sliding windows, fp32 and fp16; all backends (sdpa, flex forward, triton) agree;
  the ops pass torch.library.opcheck and run under torch.compile and FakeTensorMode
  (test_custom_op.py). The kernels are also
  compiled ahead of time for sm_80 and sm_90 (test_aot_compile.py; figures in docs/kernel.md).

Known limits
  * Correctness is proven in the interpreter and the kernels compile for sm_80/sm_90, but no
    GPU run or GPU timing has been made from this repository; block sizes and warps are
    first choices checked only for spills and shared memory.
  * bf16 is exercised in the interpreter only through an fp32 upcast before tl.dot (the
    interpreter's bf16 dot is broken), so the tests cannot see bf16-specific GPU behaviour.
  * No dropout, no attention bias / score_mod, no KV cache, query and key length are equal.
  * Called directly, the block table is built per call (cheap, but a host sync); pass
    ``block_table=`` to reuse one. megatron_gem.gem_attention builds it once per batch
    (attention/batch_cache.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .block_table import GemBlockTable, build_block_table, placeholder_block_table


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# The rule, in tl. Mirrors megatron_gem.gem.mask.allowed term by term (roles: PREFIX=0,
# SPECIAL=1, SUFFIX=2); test_triton_gem_attention ties the two through the kernel's output.
# Out-of-bounds positions (the row tail past L) are never allowed.
# --------------------------------------------------------------------------------------------
@triton.jit
def _gem_allowed(offs_m, offs_n, doc_q, doc_k, role_q, role_k, start_k, L, WINDOW, SUFFIX_SEES_BOS: tl.constexpr):
    same_doc = doc_q[:, None] == doc_k[None, :]
    causal = offs_n[None, :] <= offs_m[:, None]
    suffix_cut = (role_q[:, None] == 2) & (role_k[None, :] == 0)
    if SUFFIX_SEES_BOS:
        suffix_cut = suffix_cut & (start_k[None, :] == 0)
    special_pair = (role_q[:, None] == 1) & (role_k[None, :] == 1) & (offs_m[:, None] != offs_n[None, :])
    in_window = (offs_m[:, None] - offs_n[None, :]) < WINDOW  # WINDOW = L when the model has none
    in_bounds = (offs_m[:, None] < L) & (offs_n[None, :] < L)
    return same_doc & causal & (suffix_cut == 0) & (special_pair == 0) & in_window & in_bounds


@triton.jit
def _load_meta(DOC, ROLE, offs, L, SUFFIX_SEES_BOS: tl.constexpr):
    """doc_id, role and is-document-start of positions ``offs`` of one row (int32)."""
    inb = offs < L
    doc = tl.load(DOC + offs, mask=inb, other=-2)
    role = tl.load(ROLE + offs, mask=inb, other=0)
    if SUFFIX_SEES_BOS:
        prev = tl.load(DOC + offs - 1, mask=inb & (offs > 0), other=-2)
        start = ((offs == 0) | (prev != doc)).to(tl.int32)
    else:
        start = tl.zeros_like(doc)
    return doc, role, start


@triton.jit
def _mm(a, b, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter's bf16 dot is wrong; fp16/bf16 products are exact in fp32, so the upcast
    # changes no result, only the execution. Compiled code never takes this branch.
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _mm_low(p, b, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """p (fp32: probabilities or dS) rounded to b's dtype, as FlashAttention does, times b.

    Compiled: p.to(b.dtype) (round to nearest even) and the dot. Interpreter: Triton's
    interpreter truncates fp32 -> bf16 (round toward zero, a bias that made the bf16 dQ error
    about 4x the bf16 reference's), so there the fp32 bits are rounded to nearest even by hand
    and the dot runs on the exactly representable fp32 values (same result as the GPU's)."""
    if INTERPRET:
        if b.dtype == tl.bfloat16:
            bits = p.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            p = bits.to(tl.float32, bitcast=True)
        else:
            p = p.to(b.dtype).to(tl.float32)
        out = tl.dot(p, b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(p.to(b.dtype), b, input_precision=PRECISION)
    return out


@triton.jit
def _to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) for the stored results, rounding to nearest even in the interpreter too (see
    _mm_low). Compiled code is a plain cast."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, j, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block ``j`` of the online softmax."""
    d_ok = offs_d[None, :] < HEAD_DIM
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    if IS_FULL:  # complete block inside the row: no bound mask
        kv_ok = d_ok
    else:
        kv_ok = (offs_n[:, None] < L) & d_ok
    k = tl.load(K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V_head + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    s = _mm(q, tl.trans(k), INTERPRET, PRECISION) * qk_scale  # [M, N], log2 units
    if not IS_FULL:
        doc_k, role_k, start_k = _load_meta(DOC_row, ROLE_row, offs_n, L, SUFFIX_SEES_BOS)
        ok = _gem_allowed(offs_m, offs_n, doc_q, doc_k, role_q, role_k, start_k, L, WINDOW, SUFFIX_SEES_BOS)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm_low(p, v, INTERPRET, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, IDX, num, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """The ``num`` key blocks listed at IDX. Only listed (visited) blocks are ever touched."""
    if INTERPRET:
        # Triton 3.6's interpreter cannot use a loaded scalar as a range() bound (it holds
        # scalars as 1-element arrays); a while loop over the same list works in every version.
        t = 0
        while t < num:
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, tl.load(IDX + t), L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
            t += 1
    else:
        # Compiled: a counted loop over the list (scf.for, which the software pipeliner handles).
        for t in range(num):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, tl.load(IDX + t), L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
    return acc, l_i, m_i


@triton.jit
def _gem_attn_fwd_kernel(
    Q, K, V, O, LSE, DOC, ROLE,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    L, WINDOW, H_Q, GROUP, NUM_QB, KV_W, FKV_W,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_Q
    h = bh % H_Q
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    Q_head = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    DOC_row = DOC + b64 * L
    ROLE_row = ROLE + b64 * L
    doc_q, role_q, _ = _load_meta(DOC_row, ROLE_row, offs_m, L, False)
    K_head = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    # Finite start: a row with no allowed key (only the masked tail past L) stays NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b * NUM_QB + i
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, KV_IDX + row * KV_W, tl.load(KV_NUM + row), L, WINDOW, qk_scale,
        False, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, FKV_IDX + row * FKV_W, tl.load(FKV_NUM + row), L, WINDOW, qk_scale,
        True, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
    )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    O_head = O + b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(O_head + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, _to(out, O.dtype.element_ty, INTERPRET), mask=q_ok)
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, m_i + tl.math.log2(l_safe), mask=offs_m < L)  # base 2


# --------------------------------------------------------------------------------------------
# Backward, pass 1: dK, dV per key block (over the query heads of its GQA group)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kv_tile(
    dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, i, sub, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """Slice ``sub`` (SUB_M rows) of query block ``i`` added into dK, dV."""
    d_ok = offs_d[None, :] < HEAD_DIM
    offs_m = i * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
    if IS_FULL:
        q_ok = d_ok
        row_ok = offs_m >= 0
    else:
        q_ok = (offs_m[:, None] < L) & d_ok
        row_ok = offs_m < L
    q = tl.load(Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(DO_head + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_ok, other=0.0)
    lse = tl.load(LSE_head + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA_head + offs_m, mask=row_ok, other=0.0)
    s = _mm(q, tl.trans(k), INTERPRET, PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if not IS_FULL:
        doc_q, role_q, _ = _load_meta(DOC_row, ROLE_row, offs_m, L, False)
        ok = _gem_allowed(offs_m, offs_n, doc_q, doc_k, role_q, role_k, start_k, L, WINDOW, SUFFIX_SEES_BOS)
        p = tl.where(ok, p, 0.0)
    dv += _mm_low(tl.trans(p), do, INTERPRET, PRECISION)
    dp = _mm(do, tl.trans(v), INTERPRET, PRECISION)
    ds = p * (dp - delta[:, None])
    dk += _mm_low(tl.trans(ds), q, INTERPRET, PRECISION)
    return dk, dv


@triton.jit
def _bwd_kv_tiles(
    dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, IDX, num, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # A query block is walked in SUB_M-row slices: the [SUB_M, BLOCK_N] score, probability and
    # gradient tiles then fit in registers next to the dK/dV accumulators (see docs/kernel.md).
    SLICES: tl.constexpr = BLOCK_M // SUB_M
    if INTERPRET:  # see _fwd_tiles: a while loop, for triton 3.6's interpreter
        t = 0
        while t < num * SLICES:
            dk, dv = _bwd_kv_tile(
                dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qm, stride_qd, stride_dom, stride_dod,
                offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, tl.load(IDX + t // SLICES), t % SLICES, L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_M, SUB_M, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
            t += 1
    else:
        for t in range(num * SLICES):
            dk, dv = _bwd_kv_tile(
                dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qm, stride_qd, stride_dom, stride_dod,
                offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, tl.load(IDX + t // SLICES), t % SLICES, L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_M, SUB_M, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
    return dk, dv


@triton.jit
def _gem_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, ROLE,
    Q_NUM, Q_IDX, FQ_NUM, FQ_IDX,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    L, WINDOW, H_Q, H_KV, NUM_KB, Q_W, FQ_W,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_KV
    hk = bh % H_KV
    b64 = b.to(tl.int64)
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    DOC_row = DOC + b64 * L
    ROLE_row = ROLE + b64 * L
    doc_k, role_k, start_k = _load_meta(DOC_row, ROLE_row, offs_n, L, SUFFIX_SEES_BOS)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row = b * NUM_KB + j
    n_partial = tl.load(Q_NUM + row)
    n_full = tl.load(FQ_NUM + row)
    for g in range(GROUP):  # constexpr trip count (a runtime bound trips triton 3.6's interpreter)
        h = (hk * GROUP + g).to(tl.int64)
        Q_head = Q + b64 * stride_qb + h * stride_qh
        DO_head = DO + b64 * stride_dob + h * stride_doh
        LSE_head = LSE + (b64 * H_Q + h) * L
        DELTA_head = DELTA + (b64 * H_Q + h) * L
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, Q_IDX + row * Q_W, n_partial, L, WINDOW, qk_scale,
            False, HEAD_DIM, BLOCK_M, SUB_M, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
        )
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, doc_k, role_k, start_k, DOC_row, ROLE_row, FQ_IDX + row * FQ_W, n_full, L, WINDOW, qk_scale,
            True, HEAD_DIM, BLOCK_M, SUB_M, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
        )
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, _to(dk, DK.dtype.element_ty, INTERPRET), mask=kv_ok)
    tl.store(DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, _to(dv, DV.dtype.element_ty, INTERPRET), mask=kv_ok)


# --------------------------------------------------------------------------------------------
# Backward, pass 2: dQ per query block
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_q_tile(
    dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, j, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key block ``j`` added into dQ."""
    d_ok = offs_d[None, :] < HEAD_DIM
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    if IS_FULL:
        kv_ok = d_ok
    else:
        kv_ok = (offs_n[:, None] < L) & d_ok
    k = tl.load(K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V_head + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    s = _mm(q, tl.trans(k), INTERPRET, PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if not IS_FULL:
        doc_k, role_k, start_k = _load_meta(DOC_row, ROLE_row, offs_n, L, SUFFIX_SEES_BOS)
        ok = _gem_allowed(offs_m, offs_n, doc_q, doc_k, role_q, role_k, start_k, L, WINDOW, SUFFIX_SEES_BOS)
        p = tl.where(ok, p, 0.0)
    dp = _mm(do, tl.trans(v), INTERPRET, PRECISION)
    ds = p * (dp - delta[:, None])
    dq += _mm_low(ds, k, INTERPRET, PRECISION)
    return dq


@triton.jit
def _bwd_q_tiles(
    dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, IDX, num, L, WINDOW, qk_scale,
    IS_FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    if INTERPRET:  # see _fwd_tiles: a while loop, for triton 3.6's interpreter
        t = 0
        while t < num:
            dq = _bwd_q_tile(
                dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, tl.load(IDX + t), L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
            t += 1
    else:
        for t in range(num):
            dq = _bwd_q_tile(
                dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, tl.load(IDX + t), L, WINDOW, qk_scale,
                IS_FULL, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
            )
    return dq


@triton.jit
def _gem_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, ROLE,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    L, WINDOW, H_Q, GROUP, NUM_QB, KV_W, FKV_W,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUFFIX_SEES_BOS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_Q
    h = bh % H_Q
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    DOC_row = DOC + b64 * L
    ROLE_row = ROLE + b64 * L
    doc_q, role_q, _ = _load_meta(DOC_row, ROLE_row, offs_m, L, False)
    K_head = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b * NUM_QB + i
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, KV_IDX + row * KV_W, tl.load(KV_NUM + row), L, WINDOW, qk_scale,
        False, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
    )
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, doc_q, role_q, DOC_row, ROLE_row, FKV_IDX + row * FKV_W, tl.load(FKV_NUM + row), L, WINDOW, qk_scale,
        True, HEAD_DIM, BLOCK_N, SUFFIX_SEES_BOS, INTERPRET, PRECISION,
    )
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, _to(dq, DQ.dtype.element_ty, INTERPRET), mask=q_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def default_launch_config(head_dim: int, device: torch.device) -> dict:
    """Tiles and, per kernel, (num_warps, num_stages); dK/dV also its query slice ``sub_m``.

    GPU: 64 x 64 tiles. Warps / stages / slices are the choices that compile without register
    spills for head dims 64 and 128 on both sm_80 and sm_90 (measured with kernels/aot.py; the
    table is in docs/kernel.md). Interpreter: 32 x 32 tiles with 16-row dK/dV slices, so the
    slicing path runs in the tests. num_warps/num_stages are ignored by the interpreter.
    """
    if device.type != "cuda":
        return {"block_m": 32, "block_n": 32, "fwd": (4, 1), "bwd_dq": (4, 1), "bwd_dkdv": (4, 1), "sub_m": 16}
    if head_dim <= 64:
        return {"block_m": 64, "block_n": 64, "fwd": (4, 3), "bwd_dq": (8, 2), "bwd_dkdv": (8, 1), "sub_m": 16}
    return {"block_m": 64, "block_n": 64, "fwd": (8, 2), "bwd_dq": (8, 2), "bwd_dkdv": (8, 2), "sub_m": 16}


def _common(q, head_dim):
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return block_d, precision


def launch_forward(q, k, v, doc, role, table: GemBlockTable, scale: float, cfg: dict):
    """The forward kernel: (o [B, Hq, L, D], lse [B, Hq, L] fp32, base 2). doc/role int32."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    block_d, precision = _common(q, D)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device=q.device, dtype=torch.float32)
    grid = (table.num_q_blocks, B * Hq)
    _gem_attn_fwd_kernel[grid](
        q, k, v, o, lse, doc, role,
        table.kv_num_blocks, table.kv_indices, table.full_kv_num_blocks, table.full_kv_indices,
        scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        L, _window_arg(table), Hq, Hq // Hkv, table.num_q_blocks, table.kv_indices.shape[-1], table.full_kv_indices.shape[-1],
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=table.block_m, BLOCK_N=table.block_n,
        SUFFIX_SEES_BOS=table.suffix_sees_bos, INTERPRET=_interpreting(), PRECISION=precision,
        num_warps=cfg["fwd"][0], num_stages=cfg["fwd"][1],
    )
    return o, lse


def backward_delta(o, do):
    """Delta = rowsum(dO * O) [B, Hq, L] fp32, the backward's softmax correction term."""
    return (o.float() * do.float()).sum(-1).contiguous()


def _bwd_common(q, table):
    block_d, precision = _common(q, q.shape[-1])
    return dict(
        HEAD_DIM=q.shape[-1], BLOCK_D=block_d, BLOCK_M=table.block_m, BLOCK_N=table.block_n,
        SUFFIX_SEES_BOS=table.suffix_sees_bos, INTERPRET=_interpreting(), PRECISION=precision,
    )


def launch_backward_dkdv(do, q, k, v, lse, delta, doc, role, table: GemBlockTable, scale: float, cfg: dict):
    """The dK/dV kernel (one program per key block and KV head): (dk, dv)."""
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    sub_m = min(cfg["sub_m"], table.block_m)
    _gem_attn_bwd_dkdv_kernel[(table.num_kv_blocks, B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, doc, role,
        table.q_num_blocks, table.q_indices, table.full_q_num_blocks, table.full_q_indices,
        scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        L, _window_arg(table), Hq, Hkv, table.num_kv_blocks, table.q_indices.shape[-1], table.full_q_indices.shape[-1],
        GROUP=Hq // Hkv, SUB_M=sub_m, num_warps=cfg["bwd_dkdv"][0], num_stages=cfg["bwd_dkdv"][1], **_bwd_common(q, table),
    )
    return dk, dv


def launch_backward_dq(do, q, k, v, lse, delta, doc, role, table: GemBlockTable, scale: float, cfg: dict):
    """The dQ kernel (one program per query block and query head): dq."""
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    dq = torch.empty_like(q)
    _gem_attn_bwd_dq_kernel[(table.num_q_blocks, B * Hq)](
        q, k, v, do, lse, delta, dq, doc, role,
        table.kv_num_blocks, table.kv_indices, table.full_kv_num_blocks, table.full_kv_indices,
        scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        L, _window_arg(table), Hq, Hq // Hkv, table.num_q_blocks, table.kv_indices.shape[-1], table.full_kv_indices.shape[-1],
        num_warps=cfg["bwd_dq"][0], num_stages=cfg["bwd_dq"][1], **_bwd_common(q, table),
    )
    return dq


def _backward(do, q, k, v, o, lse, doc, role, table: GemBlockTable, scale: float, cfg: dict):
    delta = backward_delta(o, do)
    dk, dv = launch_backward_dkdv(do, q, k, v, lse, delta, doc, role, table, scale, cfg)
    dq = launch_backward_dq(do, q, k, v, lse, delta, doc, role, table, scale, cfg)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library custom ops: the kernels as opaque operators with fake (meta) implementations, so
# they run under torch.compile (dynamo does not trace into the launchers) and under
# FakeTensorMode (shapes and dtypes of outputs and gradients, no launch: memory estimation).
# The block table travels as its tensors plus ints; the launch config as a flat int list.
# --------------------------------------------------------------------------------------------
_CFG_KEYS = ("block_m", "block_n", "sub_m")
_CFG_PAIRS = ("fwd", "bwd_dq", "bwd_dkdv")


def _pack_cfg(cfg: dict) -> list[int]:
    out = [int(cfg[k]) for k in _CFG_KEYS]
    for k in _CFG_PAIRS:
        out += [int(cfg[k][0]), int(cfg[k][1])]
    return out


def _unpack_cfg(packed: list[int]) -> dict:
    cfg = dict(zip(_CFG_KEYS, packed[:3]))
    for i, k in enumerate(_CFG_PAIRS):
        cfg[k] = (packed[3 + 2 * i], packed[4 + 2 * i])
    return cfg


def _window_arg(table: GemBlockTable) -> int:
    """The kernels' WINDOW: the model's window, or L (no pair of the row is L or more apart)."""
    L = table.seq_len
    return L if table.sliding_window is None else min(table.sliding_window, L)


def _table(lists, seq_len, block_m, block_n, suffix_sees_bos, window) -> GemBlockTable:
    return GemBlockTable(*lists, seq_len=seq_len, block_m=block_m, block_n=block_n, suffix_sees_bos=suffix_sees_bos, sliding_window=window or None)


@torch.library.custom_op("megatron_gem::gem_attention_fwd", mutates_args=())
def gem_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, role: torch.Tensor,
    kv_num: torch.Tensor, kv_idx: torch.Tensor, fkv_num: torch.Tensor, fkv_idx: torch.Tensor,
    q_num: torch.Tensor, q_idx: torch.Tensor, fq_num: torch.Tensor, fq_idx: torch.Tensor,
    scale: float, block_m: int, block_n: int, suffix_sees_bos: bool, window: int, cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, Hq, L, D] like q, lse [B, Hq, L] fp32 base 2). ``window`` 0 means none."""
    lists = (kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx)
    table = _table(lists, q.shape[2], block_m, block_n, suffix_sees_bos, window)
    return launch_forward(q, k, v, doc, role, table, scale, _unpack_cfg(cfg))


@gem_attention_fwd.register_fake
def _(q, k, v, doc, role, kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx, scale, block_m, block_n, suffix_sees_bos, window, cfg):
    B, Hq, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.custom_op("megatron_gem::gem_attention_bwd", mutates_args=())
def gem_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    doc: torch.Tensor, role: torch.Tensor,
    kv_num: torch.Tensor, kv_idx: torch.Tensor, fkv_num: torch.Tensor, fkv_idx: torch.Tensor,
    q_num: torch.Tensor, q_idx: torch.Tensor, fq_num: torch.Tensor, fq_idx: torch.Tensor,
    scale: float, block_m: int, block_n: int, suffix_sees_bos: bool, window: int, cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) like (q, k, v)."""
    lists = (kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx)
    table = _table(lists, q.shape[2], block_m, block_n, suffix_sees_bos, window)
    return _backward(do, q, k, v, o, lse, doc, role, table, scale, _unpack_cfg(cfg))


@gem_attention_bwd.register_fake
def _(do, q, k, v, o, lse, doc, role, kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx, scale, block_m, block_n, suffix_sees_bos, window, cfg):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_TENSOR_ARGS = 13  # q, k, v, doc, role and the eight table lists


def _setup_context(ctx, inputs, output):
    o, lse = output
    q, k, v, doc, role = inputs[:5]
    ctx.save_for_backward(q, k, v, o, lse, doc, role, *inputs[5:_N_TENSOR_ARGS])
    ctx.consts = inputs[_N_TENSOR_ARGS:]
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse, doc, role, *lists = ctx.saved_tensors
    dq, dk, dv = gem_attention_bwd(do, q, k, v, o, lse, doc, role, *lists, *ctx.consts)
    return (dq, dk, dv) + (None,) * (_N_TENSOR_ARGS - 3 + len(ctx.consts))


gem_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def triton_gem_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor,
    roles: torch.Tensor,
    *,
    scale: float | None = None,
    suffix_sees_bos: bool = False,
    sliding_window: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_table: GemBlockTable | None = None,
    bwd_sub_m: int | None = None,
    launch_config: dict | None = None,
) -> torch.Tensor:
    """GEM attention with the block-sparse Triton kernel (differentiable in q, k, v).

    q [B, Hq, L, D], k and v [B, Hkv, L, D] with Hkv dividing Hq (GQA/MQA, K/V never repeated),
    D <= 256; fp16, bf16 or fp32; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    doc_ids, roles: integer [B, L] (documents are contiguous runs of distinct doc_ids).
    Returns [B, Hq, L, D] in q's dtype. ``sliding_window``: the model's window W (query q sees
    keys k with q - k < W, gem/mask.py rule 5) or None. ``block_table`` (built by
    build_block_table for the same doc_ids/roles, block sizes, suffix_sees_bos and window) skips
    rebuilding it. Runs through the torch.library ops ``megatron_gem::gem_attention_fwd`` /
    ``_bwd``: under FakeTensorMode (CUDA fake tensors too) nothing launches, outputs and
    gradients get their shapes and dtypes, and a placeholder table stands in for the real one. ``bwd_sub_m``: rows
    of a query block the dK/dV pass handles per step (a power of two dividing block_m, >= 16).
    ``launch_config``: a full dict in the form of default_launch_config (tiles, per-kernel
    (num_warps, num_stages), sub_m) used instead of the default (tools/gpu_check.py tunes with it).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, L, D = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (B, L, D) or Hq % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (Hkv must divide Hq)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported")
    if doc_ids.shape != (B, L) or roles.shape != (B, L):
        raise ValueError(f"doc_ids/roles must be [B, L] = {(B, L)}; got {tuple(doc_ids.shape)}, {tuple(roles.shape)}")
    if q.device.type != "cuda" and not _interpreting() and not is_fake(q):  # a fake q launches nothing (checked last: torch.compile cannot trace is_fake)
        raise RuntimeError("the Triton GEM kernel needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    cfg = dict(launch_config) if launch_config is not None else default_launch_config(D, q.device)
    if bwd_sub_m is not None:
        cfg["sub_m"] = bwd_sub_m
    if block_table is None:
        bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
        if is_fake(q) or is_fake(doc_ids):  # FakeTensorMode: no data, and the fake op reads no table
            block_table = placeholder_block_table(B, L, block_m=bm, block_n=bn, device=q.device, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
        else:
            block_table = build_block_table(doc_ids, roles, block_m=bm, block_n=bn, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
    elif (
        block_table.seq_len != L
        or block_table.suffix_sees_bos != suffix_sees_bos
        or block_table.sliding_window != sliding_window
        or (block_m is not None and block_table.block_m != block_m)
        or (block_n is not None and block_table.block_n != block_n)
    ):
        raise ValueError("block_table was built for another length, tiling or suffix_sees_bos (or sliding_window)")
    for name, size in (("block_m", block_table.block_m), ("block_n", block_table.block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16 (tl.dot / tl.arange)")
    sub_m = min(cfg["sub_m"], block_table.block_m)
    if sub_m < 16 or block_table.block_m % sub_m or sub_m & (sub_m - 1):
        raise ValueError(f"bwd_sub_m={sub_m} must be a power of two >= 16 dividing block_m={block_table.block_m}")
    doc = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
    role = roles.to(device=q.device, dtype=torch.int32).contiguous()
    t = block_table
    lists = (t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices, t.q_num_blocks, t.q_indices, t.full_q_num_blocks, t.full_q_indices)
    out, _ = gem_attention_fwd(
        q, k, v, doc, role, *(x.to(q.device) for x in lists),
        float(scale), t.block_m, t.block_n, t.suffix_sees_bos, t.sliding_window or 0, _pack_cfg(cfg),
    )
    return out
