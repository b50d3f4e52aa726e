"""transformers adapter: GEM attention as an HF attention implementation named "gem".

Usage: ``use_gem_attention(model, backend="auto")`` then call the model with the packed
batch's metadata as extra keyword arguments: ``model(input_ids, position_ids=...,
doc_ids=..., roles=...)``. transformers forwards those keywords to every attention call.

With a KV cache, queries that read it pass the keys' metadata too (``gem_key_doc_ids``,
``gem_key_roles``, ``gem_key_index``, ``gem_query_index``, optionally ``gem_key_is_doc_start``):
see ``_cached_gem_attention``; summary mode's phase-2 fast path (hf/summary.py) uses it.

Without doc_ids/roles (e.g. ``generate()``), "gem" falls back to plain causal attention,
which is what GEM means for text without special tokens. That fallback ignores padding masks:
for padded batched generation switch the model to "sdpa" (a GEM export loads with sdpa).

Sliding windows: transformers passes a windowed model's ``config.sliding_window`` (Mistral) to
every attention call as the ``sliding_window`` keyword; each path here executes it (the GEM
rule's window, gem/mask.py rule 5, in every backend, the cached path and the causal
fallback), so training, generation and embedding attend alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cached import gem_attention_over_cache
from .dispatch import gem_attention

ATTN_NAME = "gem"
_registered = False


def _no_mask(*args, **kwargs):
    # GEM builds its own (block-sparse) mask from doc_ids/roles; never let transformers
    # materialise a dense [B, L, L] mask for us.
    return None


def _causal_fallback(query, key, value, scaling, sliding_window=None):
    q_len, k_len = query.shape[2], key.shape[2]
    enable_gqa = key.shape[1] != query.shape[1]
    if q_len == k_len and (sliding_window is None or sliding_window >= k_len):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=enable_gqa)
    # Queries are the last q_len positions of the k_len keys (KV cache): causal with an offset,
    # and, with a window W, only the keys fewer than W positions back (HF's sliding window).
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    k_pos = torch.arange(k_len, device=query.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)


def _cached_gem_attention(module, query, key, value, doc_ids, roles, scaling, kwargs):
    """Queries that read a KV cache (the summary step of summary mode, a readout after a
    prefill): ``key``/``value`` [B, Hkv, Lk, D] are the cached keys followed by the queries' own,
    described by ``gem_key_doc_ids`` / ``gem_key_roles`` / ``gem_key_index`` [B, Lk] (index = the
    key's position in its packed row; a cached key that must stay invisible carries a doc id no
    query has), the queries by ``doc_ids`` / ``roles`` / ``gem_query_index`` [B, Lq]
    (cached.gem_attention_over_cache)."""
    k_doc, k_role, k_index, q_index = (kwargs.get(n) for n in ("gem_key_doc_ids", "gem_key_roles", "gem_key_index", "gem_query_index"))
    if k_role is None or k_index is None or q_index is None:
        raise ValueError("GEM attention over a KV cache needs gem_key_doc_ids, gem_key_roles, gem_key_index and gem_query_index")
    return gem_attention_over_cache(
        query,
        key,
        value,
        q_doc=doc_ids,
        q_role=roles,
        q_index=q_index,
        k_doc=k_doc,
        k_role=k_role,
        k_index=k_index,
        k_is_doc_start=kwargs.get("gem_key_is_doc_start"),
        scale=scaling,
        suffix_sees_bos=getattr(module.config, "gem_suffix_sees_bos", False),
        sliding_window=kwargs.get("sliding_window"),
    )


def hf_gem_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers AttentionInterface function: query [B, H, L, D] -> ([B, L, H, D], None)."""
    if dropout:
        raise ValueError("GEM attention does not implement attention dropout; set config.attention_dropout=0")
    doc_ids, roles = kwargs.get("doc_ids"), kwargs.get("roles")
    window = kwargs.get("sliding_window")  # transformers passes the model's window (Mistral); None without one
    if doc_ids is None and roles is None:
        out = _causal_fallback(query, key, value, scaling, window)
    elif doc_ids is None or roles is None:
        raise ValueError("GEM attention needs both doc_ids and roles (got only one of them)")
    elif kwargs.get("gem_key_doc_ids") is not None:
        out = _cached_gem_attention(module, query, key, value, doc_ids, roles, scaling, kwargs)
    else:
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                "GEM attention with doc_ids/roles and a KV cache needs the keys' metadata (gem_key_doc_ids, gem_key_roles, gem_key_index, gem_query_index)"
            )
        cfg = module.config
        out = gem_attention(
            query,
            key,
            value,
            doc_ids,
            roles,
            scale=scaling,
            backend=kwargs.get("gem_backend") or getattr(cfg, "gem_attention_backend", "auto"),
            suffix_sees_bos=getattr(cfg, "gem_suffix_sees_bos", False),
            sliding_window=window,
        )
    return out.transpose(1, 2).contiguous(), None


def register_gem_attention() -> None:
    """Register "gem" with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, hf_gem_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    _registered = True


def use_gem_attention(model, *, backend: str = "auto", suffix_sees_bos: bool = False):
    """Switch an HF model to GEM attention; turns the KV cache off (packing needs it off)."""
    register_gem_attention()
    model.config.gem_attention_backend = backend
    model.config.gem_suffix_sees_bos = suffix_sees_bos
    model.config.use_cache = False
    model.set_attn_implementation(ATTN_NAME)
    return model
