"""gem_attention: execute the GEM rule (megatron_gem.gem.mask) with a chosen backend.

Backends
  sdpa    torch SDPA. A batch whose GEM mask is the plain causal mask (gem.mask.
          equals_causal_mask: one document per row without padding, plain text or the K = 1
          embedding layout ``text SPECIAL``, no window shorter than the row) runs
          ``is_causal=True`` without a mask (flash / cuDNN kernels on GPU). Any other batch runs
          the dense boolean mask from gem_mask: the reference and the CPU training path (forward
          and backward everywhere), O(L^2) memory. On CUDA the dense path refuses, naming the
          right backend, when its fp32 score tensor [B, Hq, L, L] would exceed
          DENSE_SCORE_FRACTION of the device's memory.
  flex    torch FlexAttention, compiled once (module level), with the rule as mask_mod and a
          BlockMask made from kernels.block_table (O(L) summaries, no dense mask; built once
          per batch). PyTorch has no FlexAttention backward on CPU: there it is forward only,
          and a call with small scores runs uncompiled (FLEX_CPU_EAGER_MAX_BYTES).
  triton  the block-sparse Triton kernel (megatron_gem.kernels; torch.library custom ops, so it
          runs under torch.compile and FakeTensorMode). CUDA tensors, or CPU tensors under
          TRITON_INTERPRET=1 (slow; tests only).
  auto    CPU: sdpa (which itself takes the causal fast path when the layout allows).
          CUDA: sdpa ``is_causal`` when the batch's layout is causal, else triton.

What a backend derives from a batch's (doc_ids, roles) (dense mask, block table, BlockMask, the
causal decision with its one host sync) is built once per batch and shared by every layer and
by activation recompute (attention/batch_cache.py).

Sliding windows (Mistral's ``config.sliding_window``): every backend executes the window as
rule 5 of gem/mask.py (query q sees key k only if q - k < W, in row positions).

FakeTensorMode (memory estimation; CUDA fake tensors too): triton and sdpa run without data
(the kernel op's fake implementation with a placeholder table; the dense path with a mask of
the right shape; the layout counts as not plain causal). flex needs the metadata's values.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from ..gem.mask import check_sliding_window, equals_causal_mask, flex_mask_mod, gem_mask
from .batch_cache import block_tables, causal_layouts, dense_masks, flex_block_masks, is_fake

BACKENDS = ("auto", "sdpa", "flex", "triton")

# The dense-mask path refuses on CUDA when the fp32 scores it materialises, B * Hq * L^2 * 4
# bytes, exceed this fraction of the device's total memory. SDPA's math kernel (the only one
# that takes a boolean mask together with grouped KV heads) holds the scores, the
# probabilities and, for the backward, a copy per layer: at a quarter of the device for the
# scores alone the step cannot fit.
DENSE_SCORE_FRACTION = 0.25

# FlexAttention's tile (its default); the BlockMask is this tiling of kernels.block_table.
FLEX_BLOCK = 128

# On CPU, where FlexAttention runs forward only and every inductor compile costs tens of seconds
# (a check path: tests, tools/gpu_check.py --cpu), a call whose eager fp32 scores
# [B, Hq, L, L] take at most this many bytes runs flex_attention uncompiled (the same result;
# the scores are small). Larger CPU calls, and every CUDA call, run compiled.
FLEX_CPU_EAGER_MAX_BYTES = 64 * 2**20

_compiled_flex = None


def compiled_flex_attention():
    """flex_attention under torch.compile, created once per process (on first use: importing
    the compiler costs seconds). Uncompiled flex_attention materialises the [B, H, L, L] scores.
    dynamic=None is PyTorch's default: the first shape compiles static, a later change of a
    dimension recompiles it as dynamic (one graph for many sequence lengths)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=None)
    return _compiled_flex


_device_memory: dict = {}


def _device_total_memory(device: torch.device) -> int:
    """Total memory in bytes of a CUDA device, read once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_memory:
        _device_memory[index] = torch.cuda.get_device_properties(index).total_memory
    return _device_memory[index]


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


def causal_layout(doc_ids, roles, *, suffix_sees_bos=False, sliding_window=None) -> bool:
    """Whether this batch's GEM mask is the plain causal mask (gem.mask.equals_causal_mask),
    decided once per batch (one host sync). Fake metadata (FakeTensorMode) holds no data to
    decide on: False, the general path."""
    if is_fake(doc_ids) or is_fake(roles):
        return False
    return causal_layouts.get(
        (doc_ids, roles),
        (suffix_sees_bos, sliding_window),
        lambda: bool(equals_causal_mask(doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)),
    )


def check_dense_fits(q: torch.Tensor) -> None:
    """Raise (on CUDA) when the dense-mask path's fp32 scores would exceed DENSE_SCORE_FRACTION
    of the device's memory; see the module docstring."""
    if q.device.type != "cuda":
        return
    B, Hq, L, _ = q.shape
    need = B * Hq * L * L * 4
    total = _device_total_memory(q.device)
    if need > DENSE_SCORE_FRACTION * total:
        raise ValueError(
            f"GEM attention backend 'sdpa': this batch's layout is not plain causal, so SDPA would run the dense GEM mask "
            f"and materialise fp32 scores [B={B}, Hq={Hq}, L={L}, L] = {need / 2**30:.1f} GiB, over "
            f"{DENSE_SCORE_FRACTION:.0%} of the {total / 2**30:.0f} GiB of {q.device}; use backend 'triton' (or 'flex'), "
            f"which never materialises the scores"
        )


def sdpa_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False, sliding_window=None):
    """SDPA backend: ``is_causal`` when the layout is plain causal, else the dense GEM mask (the
    reference; GQA handled without copying through enable_gqa). Mask and decision are built
    once per batch and shared by every layer."""
    enable_gqa = k.shape[1] != q.shape[1]
    if causal_layout(doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return dense_gem_attention(q, k, v, doc_ids, roles, scale=scale, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)


def dense_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False, sliding_window=None):
    """The reference: the dense boolean mask of gem_mask [B, 1, L, L] and SDPA (any layout)."""
    check_dense_fits(q)
    if is_fake(q) or is_fake(doc_ids):
        # FakeTensorMode (memory estimation): a mask of the real shape and dtype, no content.
        mask = _fake_dense_mask(doc_ids, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    mask = dense_masks.get(
        (doc_ids, roles),
        (suffix_sees_bos, sliding_window, q.device),
        lambda: gem_mask(doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)[:, None].to(q.device),
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _fake_dense_mask(doc_ids: torch.Tensor, device) -> torch.Tensor:
    """The dense mask of a batch under FakeTensorMode: one per batch (kept on the ``doc_ids``
    object, which every layer of a forward receives), as ``dense_masks`` shares one real mask
    among the layers; a mask per layer would count the mask once per layer (SDPA keeps it for
    the backward)."""
    mask = getattr(doc_ids, "_gem_fake_dense_mask", None)
    if mask is None:
        B, L = doc_ids.shape
        mask = torch.empty((B, 1, L, L), dtype=torch.bool, device=device)
        doc_ids._gem_fake_dense_mask = mask
    return mask


def flex_block_mask(doc_ids, roles, *, device, suffix_sees_bos=False, sliding_window=None):
    """FlexAttention's BlockMask of the GEM rule: the block table's FULL / PARTIAL lists at
    FLEX_BLOCK x FLEX_BLOCK (untrimmed, FlexAttention's layout; no dense mask is built) and
    gem.mask.flex_mask_mod for the PARTIAL tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    from ..kernels import build_block_table

    doc_ids, roles = doc_ids.to(device), roles.to(device)
    t = build_block_table(doc_ids, roles, block_m=FLEX_BLOCK, block_n=FLEX_BLOCK, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window, trim=False)
    L = doc_ids.shape[1]
    return BlockMask.from_kv_blocks(
        t.kv_num_blocks[:, None],
        t.kv_indices[:, None],
        t.full_kv_num_blocks[:, None],
        t.full_kv_indices[:, None],
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=flex_mask_mod(doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window),
        seq_lengths=(L, L),
    )


def flex_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False, sliding_window=None):
    """FlexAttention backend: the rule as mask_mod, visited block-sparsely by the compiled
    flex_attention (small CPU calls: uncompiled, see FLEX_CPU_EAGER_MAX_BYTES)."""
    block_mask = flex_block_masks.get(
        (doc_ids, roles),
        (suffix_sees_bos, sliding_window, q.device),
        lambda: flex_block_mask(doc_ids, roles, device=q.device, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window),
    )
    B, Hq, L, _ = q.shape
    if q.device.type == "cpu" and B * Hq * L * L * 4 <= FLEX_CPU_EAGER_MAX_BYTES:
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    # enable_gqa=True also for Hq == Hkv (valid there): one compiled graph for every head layout.
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def triton_gem_attention(q, k, v, doc_ids, roles, *, scale=None, suffix_sees_bos=False, sliding_window=None):
    # imported lazily: triton is optional on CPU
    from ..kernels import build_block_table, default_launch_config, placeholder_block_table
    from ..kernels import triton_gem_attention as _triton

    cfg = default_launch_config(q.shape[-1], q.device)
    bm, bn = cfg["block_m"], cfg["block_n"]

    def build():
        if is_fake(q) or is_fake(doc_ids):  # FakeTensorMode: no data; the kernel op's fake impl reads no table
            B, L = doc_ids.shape
            return placeholder_block_table(B, L, block_m=bm, block_n=bn, device=q.device, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
        d, r = doc_ids.to(q.device), roles.to(q.device)
        return build_block_table(d, r, block_m=bm, block_n=bn, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)

    table = block_tables.get((doc_ids, roles), (bm, bn, suffix_sees_bos, sliding_window, q.device), build)
    return _triton(q, k, v, doc_ids, roles, scale=scale, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window, block_table=table)


_IMPLS = {"sdpa": sdpa_gem_attention, "flex": flex_gem_attention, "triton": triton_gem_attention}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a name runs on a device, before the layout is looked at (``auto``: triton on
    CUDA, sdpa elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEM attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "sdpa"


def choose_backend(backend: str, device: torch.device, doc_ids, roles, *, suffix_sees_bos=False, sliding_window=None) -> str:
    """The backend that runs this batch: a named one as is; ``auto`` by device and layout (CPU:
    sdpa; CUDA: sdpa when the batch's layout is plain causal, else triton)."""
    name = resolve_backend(backend, device)
    if backend == "auto" and name == "triton" and causal_layout(doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window):
        name = "sdpa"  # plain causal: SDPA's flash / cuDNN kernels
    return name


def gem_attention(q, k, v, doc_ids, roles, *, scale=None, backend="auto", suffix_sees_bos=False, sliding_window=None):
    """Attention under the GEM mask.

    q [B, Hq, L, D], k and v [B, Hkv, L, D] (Hkv divides Hq), doc_ids and roles [B, L]
    integer tensors. Returns [B, Hq, L, D]. ``scale`` defaults to 1/sqrt(D).
    ``sliding_window``: the model's window W (None: none); query q then sees key k only if
    q - k < W (gem/mask.py rule 5), in every backend.
    """
    _check_shapes(q, k, v, doc_ids, roles)
    check_sliding_window(sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = choose_backend(backend, q.device, doc_ids, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
    # A fake q (FakeTensorMode: memory estimation) launches nothing: the kernel op's fake
    # implementation gives the outputs' shapes on any device.
    if name == "triton" and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and not is_fake(q):
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")
    return _IMPLS[name](q, k, v, doc_ids, roles, scale=scale, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
