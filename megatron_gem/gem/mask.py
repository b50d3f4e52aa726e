"""THE GEM attention rule: the single place where "may query q attend key k" is decided.

Every backend executes this rule: the dense boolean mask below (the reference and the CPU
training path), FlexAttention through :func:`flex_mask_mod`, and the Triton kernel, which
re-states :func:`allowed` in ``tl`` and is tested against :func:`gem_mask`.

Query q may attend key k (same packed row) iff all hold (docs/method.md, "The mask"):
  1. same document                     doc_ids[q] == doc_ids[k]
  2. causal                            k <= q
  3. the suffix is cut off from the prefix:
                                       not (role[q] == SUFFIX and role[k] == PREFIX)
     (with ``suffix_sees_bos`` the document's first token stays visible to the suffix)
  4. special tokens do not see each other:
                                       not (role[q] == SPECIAL and role[k] == SPECIAL and q != k)
Every token sees itself, so no softmax row is empty.
"""

from __future__ import annotations

import torch

from .roles import Role

# Plain ints: IntEnum members confuse some tracers (FlexAttention's vmap) into integer results.
_PREFIX, _SPECIAL, _SUFFIX = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def allowed(q_idx, k_idx, doc_q, doc_k, role_q, role_k, k_is_doc_start=None, suffix_sees_bos=False):
    """Elementwise form of the rule. Arguments broadcast against each other (tensors).

    ``k_is_doc_start`` (bool, key side) is needed only when ``suffix_sees_bos`` is True.
    """
    same_doc = doc_q == doc_k
    causal = k_idx <= q_idx
    suffix_cut = (role_q == _SUFFIX) & (role_k == _PREFIX)
    if suffix_sees_bos:
        if k_is_doc_start is None:
            raise ValueError("suffix_sees_bos=True needs k_is_doc_start")
        suffix_cut = suffix_cut & ~k_is_doc_start
    special_pair = (role_q == _SPECIAL) & (role_k == _SPECIAL) & (q_idx != k_idx)
    return same_doc & causal & ~suffix_cut & ~special_pair


def doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True at the first token of each document (along the last dimension)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return starts


def _check(doc_ids: torch.Tensor, roles: torch.Tensor) -> None:
    if doc_ids.shape != roles.shape:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and roles {tuple(roles.shape)} differ in shape")
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids/roles must be [L] or [B, L], got {tuple(doc_ids.shape)}")
    if doc_ids.dtype.is_floating_point or roles.dtype.is_floating_point:
        raise TypeError("doc_ids and roles must be integer tensors")


def gem_mask(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False) -> torch.Tensor:
    """Dense boolean GEM mask.

    doc_ids, roles: integer tensors [L] or [B, L]; documents are contiguous runs of equal
    doc_id (any labels that change at document boundaries). Returns [L, L] or [B, L, L],
    True where query (row) may attend key (column). O(L^2) memory: the reference and the
    small-L path; long sequences use the block-sparse kernel.
    """
    _check(doc_ids, roles)
    L = doc_ids.shape[-1]
    idx = torch.arange(L, device=doc_ids.device)
    starts = doc_starts(doc_ids) if suffix_sees_bos else None
    return allowed(
        idx[:, None],
        idx[None, :],
        doc_ids[..., :, None],
        doc_ids[..., None, :],
        roles[..., :, None],
        roles[..., None, :],
        k_is_doc_start=None if starts is None else starts[..., None, :],
        suffix_sees_bos=suffix_sees_bos,
    )


def gem_mask_for_queries(
    q_index: torch.Tensor,
    q_doc: torch.Tensor,
    q_role: torch.Tensor,
    k_index: torch.Tensor,
    k_doc: torch.Tensor,
    k_role: torch.Tensor,
    *,
    k_is_doc_start: torch.Tensor | None = None,
    suffix_sees_bos: bool = False,
) -> torch.Tensor:
    """The rule for a subset of queries against an explicit key list: [B, Q] query metadata
    and [B, K] key metadata, ``*_index`` being each token's index in its packed row. Returns
    [B, Q, K]. Used where queries and keys are not one row laid out once: the summary step
    that reads a KV cache (keys = cached row + the new summary tokens, summary mode and
    GEMEmbedder's readout from a generation prefill). A cached key that must stay invisible
    (e.g. a stale copy of a summary token) gets a doc id no query has."""
    return allowed(
        q_index[..., :, None],
        k_index[..., None, :],
        q_doc[..., :, None],
        k_doc[..., None, :],
        q_role[..., :, None],
        k_role[..., None, :],
        k_is_doc_start=None if k_is_doc_start is None else k_is_doc_start[..., None, :],
        suffix_sees_bos=suffix_sees_bos,
    )


def flex_mask_mod(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False):
    """The rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over [B, L] metadata."""
    _check(doc_ids, roles)
    if doc_ids.dim() == 1:
        doc_ids, roles = doc_ids[None], roles[None]
    starts = doc_starts(doc_ids)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(
            q_idx,
            kv_idx,
            doc_ids[b, q_idx],
            doc_ids[b, kv_idx],
            roles[b, q_idx],
            roles[b, kv_idx],
            k_is_doc_start=starts[b, kv_idx],
            suffix_sees_bos=suffix_sees_bos,
        )

    return mask_mod
