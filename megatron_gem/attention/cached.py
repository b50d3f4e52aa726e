"""GEM attention for queries that read cached keys (summary mode's summary step, a readout after
a generation prefill): the queries are a few tokens, the keys a cached row followed by the
queries' own. The rule is mask.gem_mask_for_queries; with few queries a dense [B, 1, Q, K] mask
and SDPA cost little. Shared by the transformers adapter (hf.py) and the megatron-core core
attention (megatron.py).

``CachedPrefix`` is what one such call receives when the cache is not the framework's own (the
megatron-core summary step): the cached keys and values and both sides' metadata, handed to the
core attention as its per-call argument, so the attention layer holds no store and knows no
schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..gem.mask import gem_mask_for_queries


def gem_attention_over_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_doc: torch.Tensor,
    q_role: torch.Tensor,
    q_index: torch.Tensor,
    k_doc: torch.Tensor,
    k_role: torch.Tensor,
    k_index: torch.Tensor,
    k_is_doc_start: torch.Tensor | None = None,
    scale: float | None = None,
    suffix_sees_bos: bool = False,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """query [B, Hq, Q, D], key/value [B, Hkv, K, D]; metadata [B, Q] / [B, K] (index = the
    token's position in its packed row; a key that must stay invisible carries a doc id no query
    has). ``sliding_window``: the model's window, measured between the row indices (gem/mask.py
    rule 5). Returns [B, Hq, Q, D]."""
    if k_doc.shape[-1] != key.shape[2] or q_index.shape[-1] != query.shape[2]:
        raise ValueError(f"the cache metadata describes {k_doc.shape[-1]} keys / {q_index.shape[-1]} queries; attention got {key.shape[2]} / {query.shape[2]}")
    mask = gem_mask_for_queries(
        q_index,
        q_doc,
        q_role,
        k_index,
        k_doc,
        k_role,
        k_is_doc_start=k_is_doc_start if suffix_sees_bos else None,
        suffix_sees_bos=suffix_sees_bos,
        sliding_window=sliding_window,
    )
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scale, enable_gqa=key.shape[1] != query.shape[1])


@dataclass(frozen=True)
class CachedPrefix:
    """The cached keys a few queries read before their own keys, for one attention call.

    ``key``/``value`` [B, Hkv, P, D]: the cached prefix (detached); ``q_*`` [B, S]: the queries'
    doc ids, roles and row indices; ``k_*`` [B, P + S]: the metadata of the prefix followed by the
    queries' own keys (gem/summary_step.py prefill_keys)."""

    key: torch.Tensor
    value: torch.Tensor
    q_doc: torch.Tensor
    q_role: torch.Tensor
    q_index: torch.Tensor
    k_doc: torch.Tensor
    k_role: torch.Tensor
    k_index: torch.Tensor
    k_is_doc_start: torch.Tensor | None = None

    def attend(self, query, key, value, *, scale=None, suffix_sees_bos=False, sliding_window=None) -> torch.Tensor:
        """query/key/value [B, H, S, D] of the queries themselves -> [B, Hq, S, D]: attention
        over the prefix followed by their own keys."""
        return gem_attention_over_cache(
            query,
            torch.cat([self.key, key], dim=2),
            torch.cat([self.value, value], dim=2),
            q_doc=self.q_doc,
            q_role=self.q_role,
            q_index=self.q_index,
            k_doc=self.k_doc,
            k_role=self.k_role,
            k_index=self.k_index,
            k_is_doc_start=self.k_is_doc_start,
            scale=scale,
            suffix_sees_bos=suffix_sees_bos,
            sliding_window=sliding_window,
        )
