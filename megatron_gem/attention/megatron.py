"""megatron-core adapter: GEM attention as the ``core_attention`` module of a layer spec.

megatron-core's SelfAttention computes Q, K, V (column-parallel, RoPE applied) and hands them
to its ``core_attention`` submodule as [L, B, heads_per_partition, D]; this module transposes
to [B, H, L, D], calls :func:`megatron_gem.gem_attention` and returns [L, B, H * D] as
DotProductAttention does. Grouped KV heads stay grouped (the backends handle GQA).

The GEM mask needs each token's document id and role. megatron-core threads exactly one
per-batch tensor from ``GPTModel.forward(attention_mask=...)`` down to every core_attention
call (through pipeline stages, recomputation and sequence parallelism, which gathers the
sequence before attention): ``attention_mask``. GEM layers therefore receive
``gem_mask_info(doc_ids, roles)`` there, an int64 [2, B, L] tensor, never a boolean mask.

Summary mode's phase-2 fast path (gem/summary_step.py) reaches this module per call: its
summary step hands the core attention a ``CachedPrefix`` (attention/cached.py: the recorded
prefill keys and values and both sides' metadata) as ``attention_mask``, put there by summary
mode's own pre-hook (mcore/summary.py). The core attention holds no store and reads no schedule.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from .cached import CachedPrefix
from .dispatch import gem_attention


def gem_mask_info(doc_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """The ``attention_mask`` argument of a GEM megatron model: int64 [2, B, L] (doc_ids, roles)."""
    if doc_ids.shape != roles.shape or doc_ids.dim() != 2:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and roles {tuple(roles.shape)} must both be [B, L]")
    return torch.stack([doc_ids.long(), roles.long()])


def split_mask_info(info: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, roles) [B, L] of a gem_mask_info tensor (or of summary mode's [3, B, S] summary-step
    info, mcore/summary.py, whose third row is the queries' row indices)."""
    if info is None or info.dim() != 3 or info.shape[0] not in (2, 3) or info.is_floating_point() or info.dtype == torch.bool:
        got = None if info is None else f"{info.dtype} {tuple(info.shape)}"
        raise ValueError(f"GEM core attention expects attention_mask = gem_mask_info(doc_ids, roles), an integer [2, B, L] tensor; got {got}")
    return info[0], info[1]


class GEMCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` (same constructor and forward contract as megatron-core's
    DotProductAttention) executing the GEM rule. ``backend`` and ``suffix_sees_bos`` come from
    the ModuleSpec params, and so does ``sliding_window`` (a Mistral model's window, executed as
    gem/mask.py rule 5 by every backend; None without one)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        *,
        backend: str = "auto",
        suffix_sees_bos: bool = False,
        sliding_window: int | None = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("GEM core attention does not support context parallelism (context_parallel_size must be 1)")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("GEM core attention implements no attention dropout; set attention_dropout=0")
        if config.apply_query_key_layer_scaling:
            raise ValueError("GEM core attention does not implement apply_query_key_layer_scaling")
        self.layer_number = max(1, layer_number)
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head dim), decided by gem_attention
        self.backend = backend
        self.suffix_sees_bos = suffix_sees_bos
        self.sliding_window = sliding_window

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """query [L, B, Hq, D], key/value [L, B, Hkv, D], attention_mask = gem_mask_info(...)
        [2, B, L] (or a CachedPrefix: queries over cached keys). Returns [L, B, Hq * D]."""
        if packed_seq_params is not None:
            raise ValueError("GEM core attention takes packing from doc_ids (attention_mask), not packed_seq_params")
        if attention_bias is not None:
            raise ValueError("GEM core attention does not support attention_bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, H, L, D]
        if isinstance(attention_mask, CachedPrefix):  # summary mode's summary step (mcore/summary.py)
            out = attention_mask.attend(q, k, v, scale=self.softmax_scale, suffix_sees_bos=self.suffix_sees_bos, sliding_window=self.sliding_window)
        else:
            doc_ids, roles = split_mask_info(attention_mask)
            if attention_mask.shape[0] != 2:
                raise RuntimeError("a summary-step attention_mask reached a GEM core attention without summary mode's hook (summary mode not attached)")
            out = gem_attention(
                q,
                k,
                v,
                doc_ids,
                roles,
                scale=self.softmax_scale,
                backend=self.backend,
                suffix_sees_bos=self.suffix_sees_bos,
                sliding_window=self.sliding_window,
            )
        L, B = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(L, B, -1)
