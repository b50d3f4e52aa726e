"""Summary readout: the embedding of a text is the mean of its K special-token states."""

from __future__ import annotations

import torch

from .roles import Role


def pool_special_states(hidden: torch.Tensor, roles: torch.Tensor, doc_ids: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Mean of last-layer states over each document's SPECIAL tokens.

    hidden [B, L, H]; roles, doc_ids [B, L] with documents numbered 0..num_docs-1 across the
    whole batch (padding and documents without special tokens ignored). Returns [num_docs, H]
    (not normalised). Raises if a document in range has no special token.
    """
    sel = (roles == Role.SPECIAL) & (doc_ids >= 0) & (doc_ids < num_docs)
    states = hidden[sel]  # [S, H]
    owners = doc_ids[sel].long()
    sums = torch.zeros(num_docs, hidden.shape[-1], device=hidden.device, dtype=states.dtype).index_add(0, owners, states)
    counts = torch.bincount(owners, minlength=num_docs)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"document(s) {missing} have no GEM special token to read out")
    return sums / counts.to(sums.dtype)[:, None]
