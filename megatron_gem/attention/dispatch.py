"""gem_attention: execute the GEM rule (megatron_gem.gem.mask) with a chosen backend.

Backends
  sdpa    dense boolean mask from gem_mask + torch SDPA. The reference and the CPU training
          path (forward and backward everywhere). O(L^2) mask memory.
  flex    torch FlexAttention with the rule as mask_mod (block-sparse). PyTorch has no
          FlexAttention backward on CPU: use it on CPU for inference only.
  triton  the block-sparse Triton kernel (megatron_gem.kernels). CUDA tensors, or CPU tensors
          under TRITON_INTERPRET=1 (slow; tests only).
  auto    triton on CUDA, sdpa on CPU.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..gem.mask import flex_mask_mod, gem_mask

BACKENDS = ("auto", "sdpa", "flex", "triton")


def _check_shapes(q, k, v, doc_ids, roles) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {k.shape[1]}")
    if doc_ids.shape != (B, L) or roles.shape != (B, L):
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and roles {tuple(roles.shape)} must be [B, L] = {(B, L)}")


def sdpa_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False):
    """Reference backend: dense mask + SDPA (GQA handled without copying through enable_gqa).
    The mask is built once per batch and shared by every layer."""
    mask = _dense_masks.get(
        doc_ids, roles, (suffix_sees_bos, q.device), lambda: gem_mask(doc_ids, roles, suffix_sees_bos=suffix_sees_bos)[:, None].to(q.device)
    )  # [B, 1, L, L]
    enable_gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def flex_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False):
    """FlexAttention backend: the same rule as mask_mod, visited block-sparsely."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, L, _ = q.shape
    mask_mod = flex_mask_mod(doc_ids, roles, suffix_sees_bos=suffix_sees_bos)
    block_mask = create_block_mask(mask_mod, B, None, L, L, device=q.device)
    enable_gqa = k.shape[1] != Hq
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


class _PerBatchCache:
    """Memo of what is derived from one batch's (doc_ids, roles): the dense mask (sdpa) or the
    block table (triton). Every layer of a forward gets the same metadata tensors, so it is
    built once per batch, not once per layer. The cache holds references to the tensors it was
    built from: their memory cannot be reused by another batch while cached, so identity +
    version equality means equal contents."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, doc_ids, roles, extra: tuple, build):
        if doc_ids.is_inference() or roles.is_inference():
            return build()  # inference tensors have no version counter: nothing safe to key on
        key = (doc_ids, roles, doc_ids._version, roles._version, *extra)
        k = self.key
        if k is None or not (k[0] is doc_ids and k[1] is roles and k[2:] == key[2:]):
            self.value = build()
            self.key = key
        return self.value


_dense_masks = _PerBatchCache()
_block_tables = _PerBatchCache()


def triton_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False):
    # imported lazily: triton is optional on CPU
    from ..kernels import build_block_table, default_launch_config
    from ..kernels import triton_gem_attention as _triton

    cfg = default_launch_config(q.shape[-1], q.device)
    bm, bn = cfg["block_m"], cfg["block_n"]
    table = _block_tables.get(
        doc_ids, roles, (bm, bn, suffix_sees_bos), lambda: build_block_table(doc_ids, roles, block_m=bm, block_n=bn, suffix_sees_bos=suffix_sees_bos)
    )
    return _triton(q, k, v, doc_ids, roles, scale=scale, suffix_sees_bos=suffix_sees_bos, block_table=table)


_IMPLS = {"sdpa": sdpa_gem_attention, "flex": flex_gem_attention, "triton": triton_gem_attention}


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEM attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "sdpa"


def gem_attention(q, k, v, doc_ids, roles, *, scale=None, backend="auto", suffix_sees_bos=False):
    """Attention under the GEM mask.

    q [B, Hq, L, D], k and v [B, Hkv, L, D] (Hkv divides Hq), doc_ids and roles [B, L]
    integer tensors. Returns [B, Hq, L, D]. ``scale`` defaults to 1/sqrt(D).
    """
    _check_shapes(q, k, v, doc_ids, roles)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device)
    if name == "triton" and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")
    return _IMPLS[name](q, k, v, doc_ids, roles, scale=scale, suffix_sees_bos=suffix_sees_bos)
