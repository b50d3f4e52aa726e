"""A transformers attention implementation that executes an explicit dense boolean mask.

For a few queries against a KV cache (GEMEmbedder.embed_from_cache: K summary tokens reading
a text's prefill), where the queries and keys are not one packed row: the caller decides the
mask with gem/mask.py's ``gem_mask_for_queries`` ([B, Q, K_total], True = may attend) and
passes it as the model keyword ``gem_explicit_mask``; this runs plain SDPA with it. Q is tiny
(K summary tokens), so the dense mask costs nothing worth a kernel.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

ATTN_NAME = "gem_explicit_mask"
_registered = False


def _no_mask(*args, **kwargs):
    return None


def explicit_mask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: query [B, H, Q, D], key/value [B, Hkv, K, D] (cache + new)."""
    if dropout:
        raise ValueError("explicit-mask attention does not implement attention dropout")
    allowed = kwargs.get("gem_explicit_mask")
    if allowed is None:
        raise ValueError(f"attention {ATTN_NAME!r} needs the model keyword gem_explicit_mask ([B, Q, K] bool)")
    want = (query.shape[0], query.shape[2], key.shape[2])
    if tuple(allowed.shape) != want:
        raise ValueError(f"gem_explicit_mask has shape {tuple(allowed.shape)}, the attention call needs {want} (batch, queries, cache + new keys)")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_explicit_mask_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, explicit_mask_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    _registered = True


@contextlib.contextmanager
def explicit_mask_attention_on(model):
    """Switch ``model`` to explicit-mask attention for the block; its previous implementation after."""
    register_explicit_mask_attention()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
