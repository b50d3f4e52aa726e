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

Summary mode's phase-2 fast path (gem/summary_step.py) runs in two schedule passes: a no-grad
prefill of the packed rows, whose post-RoPE keys and values every layer records in a
``PrefillKV`` (``record_slot`` = the micro-batch), then the summary step, whose
``attention_mask`` is ``summary_query_info(...)`` (int64 [4, B, S]: the queries' doc ids, roles,
row indices, and the micro-batch slot, so a recomputed layer finds its cache again) and whose
layers attend the recorded keys followed by their own (attention/cached.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from ..gem.summary_step import prefill_keys
from .cached import gem_attention_over_cache
from .dispatch import gem_attention


def gem_mask_info(doc_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """The ``attention_mask`` argument of a GEM megatron model: int64 [2, B, L] (doc_ids, roles)."""
    if doc_ids.shape != roles.shape or doc_ids.dim() != 2:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and roles {tuple(roles.shape)} must both be [B, L]")
    return torch.stack([doc_ids.long(), roles.long()])


def summary_query_info(queries: dict, slot: int) -> torch.Tensor:
    """The ``attention_mask`` argument of a summary step over a recorded prefill: int64 [4, B, S]
    (doc ids, roles, row indices of the gathered queries of gem/summary_step.py, and ``slot``,
    the micro-batch whose prefill they read)."""
    docs = queries["doc_ids"].long()
    return torch.stack([docs, queries["roles"].long(), queries["index"].long(), torch.full_like(docs, slot)])


def split_mask_info(info: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, roles) [B, L] of a gem_mask_info or summary_query_info tensor."""
    if info is None or info.dim() != 3 or info.shape[0] not in (2, 4) or info.is_floating_point() or info.dtype == torch.bool:
        got = None if info is None else f"{info.dtype} {tuple(info.shape)}"
        raise ValueError(f"GEM core attention expects attention_mask = gem_mask_info(doc_ids, roles), an integer [2, B, L] tensor; got {got}")
    return info[0], info[1]


class PrefillKV:
    """Keys and values of a no-grad prefill, per (micro-batch slot, layer), for the summary step
    of the same optimizer step. While ``record_slot`` is set every GEM core attention holding this
    store records its inputs under that slot; ``clear()`` drops everything (end of the step)."""

    def __init__(self) -> None:
        self.record_slot: int | None = None
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: int, key: torch.Tensor, value: torch.Tensor, info: torch.Tensor) -> None:
        self.entries[(self.record_slot, layer)] = (key.detach(), value.detach(), info)

    def read(self, slot: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (slot, layer) not in self.entries:
            raise RuntimeError(f"summary step: no recorded prefill for micro-batch {slot}, layer {layer}")
        return self.entries[(slot, layer)]

    def clear(self) -> None:
        self.record_slot = None
        self.entries.clear()


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
        self.prefill_kv: PrefillKV | None = None  # set by summary mode (mcore/summary.py)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """query [L, B, Hq, D], key/value [L, B, Hkv, D], attention_mask = gem_mask_info(...)
        [2, B, L]. Returns [L, B, Hq * D]."""
        if packed_seq_params is not None:
            raise ValueError("GEM core attention takes packing from doc_ids (attention_mask), not packed_seq_params")
        if attention_bias is not None:
            raise ValueError("GEM core attention does not support attention_bias")
        doc_ids, roles = split_mask_info(attention_mask)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, H, L, D]
        if attention_mask.shape[0] == 4:
            out = self._summary_step(q, k, v, attention_mask)
        else:
            if self.prefill_kv is not None and self.prefill_kv.record_slot is not None:
                self.prefill_kv.record(self.layer_number, k, v, attention_mask)
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

    def _summary_step(self, q, k, v, info):
        """The gathered summary tokens (q/k/v [B, H, S, D]) over the recorded prefill of their
        micro-batch, then their own keys (gem/summary_step.py)."""
        if self.prefill_kv is None:
            raise RuntimeError("a summary-step attention_mask reached a GEM core attention without a prefill store (summary mode not attached)")
        slot = int(info[3, 0, 0])
        k_pre, v_pre, pre_info = self.prefill_kv.read(slot, self.layer_number)
        queries = {"doc_ids": info[0], "roles": info[1], "index": info[2]}
        keys = prefill_keys(pre_info[0], pre_info[1], queries)
        return gem_attention_over_cache(
            q,
            torch.cat([k_pre, k], dim=2),
            torch.cat([v_pre, v], dim=2),
            q_doc=info[0],
            q_role=info[1],
            q_index=info[2],
            k_doc=keys["doc_ids"],
            k_role=keys["roles"],
            k_index=keys["index"],
            k_is_doc_start=keys["is_doc_start"],
            scale=self.softmax_scale,
            suffix_sees_bos=self.suffix_sees_bos,
            sliding_window=self.sliding_window,
        )
