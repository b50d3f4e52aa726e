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
  5. only with a model's sliding window W (Mistral's ``config.sliding_window``):
                                       q - k < W
Every token sees itself, so no softmax row is empty.

The window is counted in positions of the packed row, exactly as transformers' Mistral counts
it (``kv_idx > q_idx - sliding_window``: a query sees itself and the W - 1 tokens before it).
Rule 1 keeps every allowed pair inside one document, whose position ids run contiguously, so
row distance and position-id distance are the same number. Special and suffix tokens are
tokens of the row like any other: the window applies to them unchanged (a suffix token sees
the special tokens only while they are fewer than W positions back), and, with
``suffix_sees_bos``, the document start only while it is inside the window. This is what a
Mistral model computes when it generates or embeds the same row, so training and serving
attend alike.
"""

from __future__ import annotations

import torch

from .roles import Role

# Plain ints: IntEnum members confuse some tracers (FlexAttention's vmap) into integer results.
_PREFIX, _SPECIAL, _SUFFIX = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def allowed(q_idx, k_idx, doc_q, doc_k, role_q, role_k, k_is_doc_start=None, suffix_sees_bos=False, sliding_window=None):
    """Elementwise form of the rule. Arguments broadcast against each other (tensors).

    ``k_is_doc_start`` (bool, key side) is needed only when ``suffix_sees_bos`` is True.
    ``sliding_window``: None (no window) or the model's window W >= 1 (rule 5).
    """
    same_doc = doc_q == doc_k
    causal = k_idx <= q_idx
    suffix_cut = (role_q == _SUFFIX) & (role_k == _PREFIX)
    if suffix_sees_bos:
        if k_is_doc_start is None:
            raise ValueError("suffix_sees_bos=True needs k_is_doc_start")
        suffix_cut = suffix_cut & ~k_is_doc_start
    special_pair = (role_q == _SPECIAL) & (role_k == _SPECIAL) & (q_idx != k_idx)
    ok = same_doc & causal & ~suffix_cut & ~special_pair
    if sliding_window is not None:
        ok = ok & (q_idx - k_idx < sliding_window)
    return ok


def check_sliding_window(sliding_window) -> None:
    """Raise unless ``sliding_window`` is None or an integer >= 1."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an integer >= 1 (the model config's sliding_window); got {sliding_window!r}")


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


def gem_mask(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False, sliding_window: int | None = None) -> torch.Tensor:
    """Dense boolean GEM mask.

    doc_ids, roles: integer tensors [L] or [B, L]; documents are contiguous runs of equal
    doc_id (any labels that change at document boundaries). Returns [L, L] or [B, L, L],
    True where query (row) may attend key (column). O(L^2) memory: the reference and the
    small-L path; long sequences use the block-sparse kernel.
    """
    _check(doc_ids, roles)
    check_sliding_window(sliding_window)
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
        sliding_window=sliding_window,
    )


def equals_causal_mask(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False, sliding_window: int | None = None) -> torch.Tensor:
    """0-dim bool tensor (no host sync): True iff the GEM mask of every row of the batch is the
    plain causal mask ``k <= q``. Read off the rule, that holds iff every row is
      * one document (rule 1; a padding run is a document of its own, so a padded row is not),
      * with at most one SPECIAL token (rule 4 hides a special token from a later one),
      * with no SUFFIX token after a PREFIX token it may not see (rule 3; with
        ``suffix_sees_bos`` the row's first token stays visible),
      * and without a window shorter than the row (rule 5).
    Plain text and the embedding layout ``text SPECIAL`` (K = 1) qualify; a split or
    reconstruct document, K >= 2 special tokens or packed documents do not. Attention backends
    run such batches as plain causal attention (SDPA ``is_causal``, flash kernels)."""
    _check(doc_ids, roles)
    check_sliding_window(sliding_window)
    if doc_ids.dim() == 1:
        doc_ids, roles = doc_ids[None], roles[None]
    L = doc_ids.shape[-1]
    if sliding_window is not None and sliding_window < L:
        return torch.zeros((), dtype=torch.bool, device=doc_ids.device)
    one_doc = (doc_ids == doc_ids[:, :1]).all()
    one_special = ((roles == _SPECIAL).sum(-1) <= 1).all()
    hidden_prefix = roles == _PREFIX
    if suffix_sees_bos:
        hidden_prefix = hidden_prefix.clone()
        hidden_prefix[:, 0] = False  # one document: position 0 is its start
    prefix_before = (torch.cumsum(hidden_prefix.long(), -1) - hidden_prefix.long()) > 0  # a hidden prefix key at k < q
    no_cut = ~((roles == _SUFFIX) & prefix_before).any()
    return one_doc & one_special & no_cut


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
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The rule for a subset of queries against an explicit key list: [B, Q] query metadata
    and [B, K] key metadata, ``*_index`` being each token's index in its packed row. Returns
    [B, Q, K]. Used where queries and keys are not one row laid out once: the summary step
    that reads a KV cache (keys = cached row + the new summary tokens, summary mode and
    GEMEmbedder's readout from a generation prefill). A cached key that must stay invisible
    (e.g. a stale copy of a summary token) gets a doc id no query has. The window (rule 5)
    is measured between the ``*_index`` row positions."""
    check_sliding_window(sliding_window)
    return allowed(
        q_index[..., :, None],
        k_index[..., None, :],
        q_doc[..., :, None],
        k_doc[..., None, :],
        q_role[..., :, None],
        k_role[..., None, :],
        k_is_doc_start=None if k_is_doc_start is None else k_is_doc_start[..., None, :],
        suffix_sees_bos=suffix_sees_bos,
        sliding_window=sliding_window,
    )


def flex_mask_mod(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False, sliding_window: int | None = None):
    """The rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over [B, L] metadata.

    ``suffix_sees_bos`` and the window are captured as tensors (the visible document starts; W,
    or L without a window), not as Python constants: every batch and setting then traces to
    the same mask_mod graph, so a compiled flex_attention does not recompile per setting."""
    _check(doc_ids, roles)
    check_sliding_window(sliding_window)
    if doc_ids.dim() == 1:
        doc_ids, roles = doc_ids[None], roles[None]
    starts = doc_starts(doc_ids)
    visible_start = starts if suffix_sees_bos else torch.zeros_like(starts)
    L = doc_ids.shape[-1]
    window = torch.tensor(L if sliding_window is None else min(sliding_window, L), device=doc_ids.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(
            q_idx,
            kv_idx,
            doc_ids[b, q_idx],
            doc_ids[b, kv_idx],
            roles[b, q_idx],
            roles[b, kv_idx],
            k_is_doc_start=visible_start[b, kv_idx],
            suffix_sees_bos=True,  # what a suffix sees of the start is in visible_start
            sliding_window=window,  # q - k < L always holds within a row
        )

    return mask_mod
