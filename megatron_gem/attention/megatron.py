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
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from .dispatch import gem_attention


def gem_mask_info(doc_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """The ``attention_mask`` argument of a GEM megatron model: int64 [2, B, L] (doc_ids, roles)."""
    if doc_ids.shape != roles.shape or doc_ids.dim() != 2:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and roles {tuple(roles.shape)} must both be [B, L]")
    return torch.stack([doc_ids.long(), roles.long()])


def split_mask_info(info: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if info is None or info.dim() != 3 or info.shape[0] != 2 or info.is_floating_point() or info.dtype == torch.bool:
        got = None if info is None else f"{info.dtype} {tuple(info.shape)}"
        raise ValueError(f"GEM core attention expects attention_mask = gem_mask_info(doc_ids, roles), an integer [2, B, L] tensor; got {got}")
    return info[0], info[1]


class GEMCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` (same constructor and forward contract as megatron-core's
    DotProductAttention) executing the GEM rule. ``backend`` and ``suffix_sees_bos`` come from
    the ModuleSpec params."""

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

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """query [L, B, Hq, D], key/value [L, B, Hkv, D], attention_mask = gem_mask_info(...)
        [2, B, L]. Returns [L, B, Hq * D]."""
        if packed_seq_params is not None:
            raise ValueError("GEM core attention takes packing from doc_ids (attention_mask), not packed_seq_params")
        if attention_bias is not None:
            raise ValueError("GEM core attention does not support attention_bias")
        doc_ids, roles = split_mask_info(attention_mask)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, H, L, D]
        out = gem_attention(q, k, v, doc_ids, roles, scale=self.softmax_scale, backend=self.backend, suffix_sees_bos=self.suffix_sees_bos)
        L, B = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(L, B, -1)
