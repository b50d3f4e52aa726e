"""What the kernel's checks share: random packed layouts, the reference, the error bound.

Used by tests/kernels (CPU, Triton interpreter) and by tools/gpu_check.py (CUDA), so the GPU
check holds the kernel to exactly the bound the tests use. torch and numpy only.

Layouts: a row is a sequence of documents, each laid out as plain / split / reconstruct / embed
with K special tokens, optionally followed by a padding run (doc_id PAD_DOC_ID). The generators
aim at the cases a block-sparse kernel gets wrong: one-token documents, special runs that
straddle a block edge, all-plain rows, a single long document, rows of different layouts in one
batch, roles in arbitrary order.

Error bound (flash-attention's tests): the kernel's error against a high-precision reference
(fp32 for fp16 / bf16 inputs, fp64 for fp32 inputs) must stay within twice the error of the
same reference computed in the input precision, plus a small slack relative to the reference's
largest magnitude.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_gem.gem.roles import PAD_DOC_ID, Role

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)

# input dtype -> (high-precision reference dtype, absolute slack relative to the reference's scale)
PRECISION = {
    torch.float32: (torch.float64, 1e-6),
    torch.float16: (torch.float32, 1e-4),
    torch.bfloat16: (torch.float32, 1e-3),
}

STYLES = ("mixed", "plain", "long", "straddle", "tiny", "chaos")


def _document(rng: np.random.Generator, n: int, k: int, kind: str) -> list[int]:
    """Roles of one document of exactly n tokens."""
    if kind == "plain" or n < 2:
        return [P] * n
    if kind == "embed":
        k = min(k, n - 1)
        return [P] * (n - k) + [S] * k
    k = min(k, n - 2) if n > 2 else 0
    if k == 0:
        return [P] * n
    cut = int(rng.integers(1, n - k))  # >= 1 prefix token and >= 1 suffix token
    return [P] * cut + [S] * k + [X] * (n - k - cut)


def random_row(rng: np.random.Generator, L: int, k: int, *, style: str = "mixed", block: int = 16, pad: bool | None = None):
    """(doc_ids, roles) int64 numpy arrays of length L.

    style: mixed (random lengths incl. 1-token docs), plain (no special tokens), long (one
    document), straddle (special runs placed across multiples of ``block``), tiny (1-3 tokens),
    chaos (roles in random order).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {STYLES}")
    docs, roles = [], []
    if pad is None:
        pad = bool(rng.random() < 0.5)
    body = L - (int(rng.integers(1, max(2, L // 4))) if pad else 0)
    pos = 0
    d = 0
    while pos < body:
        room = body - pos
        if style == "long":
            n = room
        elif style == "tiny":
            n = int(rng.integers(1, 4))
        elif style == "straddle":
            # end the prefix just before the next block edge so the K specials cross it
            edge = (pos // block + 1) * block
            cut = max(1, edge - pos - max(1, k // 2))
            n = cut + k + int(rng.integers(1, 2 * block))
        else:
            n = int(rng.choice([1, 2, int(rng.integers(3, 20)), int(rng.integers(20, 3 * block + 1))]))
        n = min(n, room)
        if style == "chaos":  # roles in any order: the rule and the table must not assume PRE*SPE*SUF
            r = [int(x) for x in rng.integers(0, 3, size=n)]
        elif style == "straddle" and n >= cut + k + 1:
            r = [P] * cut + [S] * k + [X] * (n - cut - k)
        else:
            kind = "plain" if style == "plain" else str(rng.choice(["plain", "split", "split", "reconstruct", "embed"]))
            r = _document(rng, n, k, kind)
        docs += [d] * n
        roles += r
        pos += n
        d += 1
    docs += [PAD_DOC_ID] * (L - body)
    roles += [P] * (L - body)
    return np.array(docs, dtype=np.int64), np.array(roles, dtype=np.int64)


def random_batch(seed: int, B: int, L: int, k: int, styles=("mixed",), block: int = 16):
    """doc_ids, roles as int64 torch tensors [B, L]; row b uses styles[b % len(styles)]."""
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, L, k, style=styles[b % len(styles)], block=block) for b in range(B)]
    doc = torch.from_numpy(np.stack([r[0] for r in rows]))
    role = torch.from_numpy(np.stack([r[1] for r in rows]))
    return doc, role


def reference_attention(q, k, v, mask, scale, dtype):
    """softmax(scale q k^T, masked) v with every op in ``dtype`` (K/V heads repeated for GQA).
    ``mask``: bool [B, L, L] (gem_mask), True where the query may see the key."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None].to(s.device), float("-inf"))
    return s.softmax(-1) @ v


def run_with_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of ``fn(q, k, v)`` for upstream gradient ``do`` (inputs are copied)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def make_inputs(seed, B, Hq, Hkv, L, D, dtype, device="cpu"):
    """Random q [B, Hq, L, D], k, v [B, Hkv, L, D], do [B, Hq, L, D] (drawn in fp32 on CPU)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(B, Hq, L, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def error_report(got, ref, low, dtype) -> dict:
    """Errors of ``got`` (one of out/dq/dk/dv) against the high-precision ``ref``, and the bound
    from ``low`` (the same reference computed in ``dtype``): {err, ref_err, bound, finite, ok}."""
    hi, slack = PRECISION[dtype]
    finite = bool(torch.isfinite(got).all())
    err = (got.to(hi) - ref).abs().max().item()
    ref_err = (low.to(hi) - ref).abs().max().item()
    bound = 2 * ref_err + slack * max(1.0, ref.abs().max().item())
    return {"err": err, "ref_err": ref_err, "bound": bound, "finite": finite, "ok": finite and err <= bound}
