"""The summary step of summary mode's phase-2 fast path, in plain PyTorch: which tokens run with
autograd and how the keys they read are described. Both engines run it: hf/summary.py over a
transformers DynamicCache, the megatron-core engine over mcore/summary.py's PrefillKV.

Why the step is exact: with the base frozen and the deltas acting only at SPECIAL positions, the
text before the summary tokens depends on no trainable parameter (a PREFIX token never attends a
SPECIAL one). So the packed rows run once without autograd and with the deltas off (the
prefill, keeping each layer's keys and values), then only the summary tokens of each row run with
autograd, reading the prefill's keys followed by their own. The prefill's copies of the summary
tokens hold base values: they get a doc id no query has (STALE_DOC_ID), so the rule
(mask.gem_mask_for_queries) never lets a query see them.
"""

from __future__ import annotations

import torch

from .mask import doc_starts
from .roles import PAD_DOC_ID, Role

# doc id of the stale prefill copies of the summary tokens: no query has it.
STALE_DOC_ID = -2


def _summary_positions(batch: dict) -> torch.Tensor:
    return (batch["roles"] == Role.SPECIAL) & (batch["doc_ids"] != PAD_DOC_ID)


def summary_width(batch: dict) -> int:
    """The most summary tokens in a row of ``batch`` (gather_summary_queries' S)."""
    return int(_summary_positions(batch).sum(dim=1).max()) if batch["input_ids"].shape[0] else 0


def gather_summary_queries(batch: dict, width: int | None = None) -> dict:
    """The summary tokens of each packed row, gathered: [B, S] tensors of their ``input_ids``,
    ``position_ids``, ``doc_ids``, ``roles`` (SPECIAL) and ``index`` (position in the row).
    S = the most summary tokens in a row, or ``width`` when given (at least that: a pipeline needs
    one shape for every micro-batch of a step). Shorter rows are padded with doc id PAD_DOC_ID and
    indices past the row (L + j), so each padding entry sees only itself and no softmax row is
    empty."""
    ids, docs = batch["input_ids"], batch["doc_ids"]
    B, L = ids.shape
    special = _summary_positions(batch)
    counts = special.sum(dim=1)
    most = int(counts.max()) if B else 0
    if width is not None and width < most:
        raise ValueError(f"width {width} is below the {most} summary tokens of a row")
    S = max(width if width is not None else most, 1)
    # Summary positions first, in row order (stable sort of "not special"); padding past L.
    order = torch.sort((~special).to(torch.int8), dim=1, stable=True).indices
    if S > L:
        order = torch.cat([order, order.new_zeros(B, S - L)], dim=1)
    order = order[:, :S]
    slot = torch.arange(S, device=ids.device).expand(B, S)
    real = slot < counts[:, None]
    return {
        "input_ids": torch.where(real, ids.gather(1, order.clamp(max=L - 1)), torch.zeros_like(order)),
        "position_ids": torch.where(real, batch["position_ids"].gather(1, order.clamp(max=L - 1)), torch.zeros_like(order)),
        "doc_ids": torch.where(real, docs.gather(1, order.clamp(max=L - 1)), torch.full_like(order, PAD_DOC_ID)),
        "roles": torch.full_like(order, int(Role.SPECIAL)),
        "index": torch.where(real, order, L + slot),
    }


def prefill_keys(doc_ids: torch.Tensor, roles: torch.Tensor, queries: dict) -> dict:
    """Metadata [B, L + S] of the keys a summary step reads: the prefill's row (its summary
    tokens made invisible: STALE_DOC_ID), then the S gathered queries' own keys. Keys ``doc_ids``,
    ``roles``, ``index`` (position in the packed row) and ``is_doc_start``."""
    B, L = doc_ids.shape
    special = (roles == Role.SPECIAL) & (doc_ids != PAD_DOC_ID)
    row_index = torch.arange(L, device=doc_ids.device).expand(B, L)
    return {
        "doc_ids": torch.cat([doc_ids.masked_fill(special, STALE_DOC_ID), queries["doc_ids"]], dim=1),
        "roles": torch.cat([roles, queries["roles"]], dim=1),
        "index": torch.cat([row_index, queries["index"]], dim=1),
        "is_doc_start": torch.cat([doc_starts(doc_ids), torch.zeros_like(queries["index"], dtype=torch.bool)], dim=1),
    }
