"""Sample layouts, per-token metadata and next-token labels (docs/method.md).

A document's tokens become one of:
  plain        text                          all PREFIX (ordinary causal LM)
  split        prefix SPECIAL*K suffix       cut at a random position
  reconstruct  text SPECIAL*K text           the text again after the specials
  embed        text SPECIAL*K                inference / contrastive readout
Token arrays are 1-D numpy int64 arrays (ids) and int8 arrays (roles): cheap to build per
document in data loaders. Batched metadata helpers (positions, labels) work on torch tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from .config import GEMConfig
from .mask import doc_starts
from .roles import IGNORE_INDEX, PAD_DOC_ID, Role

LAYOUT_NAMES = ("plain", "split", "reconstruct", "embed")


def build_layout(
    tokens: Sequence[int] | np.ndarray,
    layout: str,
    special_ids: Sequence[int],
    *,
    cut: int | None = None,
    bos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lay one document out. Returns (ids int64 [n'], roles int8 [n']).

    ``cut`` (split only): number of tokens before the special tokens, 1 <= cut < len(tokens).
    ``bos_id`` (reconstruct only): a leading BOS is not repeated in the second copy.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    specials = np.asarray(special_ids, dtype=np.int64)
    k = specials.shape[0]
    if n == 0:
        raise ValueError("cannot lay out an empty document")
    if layout == "plain":
        return tokens, np.full(n, Role.PREFIX, dtype=np.int8)
    if k == 0:
        raise ValueError(f"layout {layout!r} needs at least one special token id")
    if layout == "split":
        if cut is None or not 1 <= cut < n:
            raise ValueError(f"split needs 1 <= cut < len(tokens)={n}, got cut={cut}")
        ids = np.concatenate([tokens[:cut], specials, tokens[cut:]])
        roles = np.concatenate([np.full(cut, Role.PREFIX, np.int8), np.full(k, Role.SPECIAL, np.int8), np.full(n - cut, Role.SUFFIX, np.int8)])
        return ids, roles
    if layout == "reconstruct":
        again = tokens[1:] if (bos_id is not None and tokens[0] == bos_id and n > 1) else tokens
        ids = np.concatenate([tokens, specials, again])
        roles = np.concatenate([np.full(n, Role.PREFIX, np.int8), np.full(k, Role.SPECIAL, np.int8), np.full(again.shape[0], Role.SUFFIX, np.int8)])
        return ids, roles
    if layout == "embed":
        ids = np.concatenate([tokens, specials])
        roles = np.concatenate([np.full(n, Role.PREFIX, np.int8), np.full(k, Role.SPECIAL, np.int8)])
        return ids, roles
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUT_NAMES}")


def draw_layout(num_tokens: int, config: GEMConfig, rng: np.random.Generator) -> tuple[str, int | None]:
    """Choose a training layout for a document of ``num_tokens`` tokens: (layout, cut).

    Plain with probability ``config.p_raw``; otherwise ``config.layout``. Documents too short
    for the GEM layout (fewer than min_prefix_len + min_suffix_len tokens for split,
    min_prefix_len for reconstruct) stay plain. Always consumes the same number of random
    draws, so one document's choice never shifts another's.
    """
    u = rng.random()
    v = rng.random()
    if u < config.p_raw:
        return "plain", None
    if config.layout == "split":
        lo, hi = config.min_prefix_len, num_tokens - config.min_suffix_len  # cut in [lo, hi]
        if hi < lo:
            return "plain", None
        return "split", lo + int(v * (hi - lo + 1))
    if num_tokens < config.min_prefix_len:
        return "plain", None
    return "reconstruct", None


def phase1_layout_config(config: GEMConfig) -> GEMConfig:
    """The config whose ``p_raw`` the phase-1 layout draw uses. Summary mode: p_raw counts as 0
    (every document gets the GEM layout): with the base model frozen, a plain document carries no
    gradient; a document too short for the layout is then left out (and counted) by the caller
    instead of staying plain (data/samples.py, integrations/collator.py)."""
    return dataclasses.replace(config, p_raw=0.0) if config.summary_mode else config


def document_rng(seed: int, epoch: int, doc_index: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one document: depends only on (seed, epoch, document, stream)."""
    return np.random.default_rng([seed, epoch, doc_index, stream])


def prefix_dropout(tokens: Sequence[int] | np.ndarray, rate: float, rng: np.random.Generator, *, keep_first: bool = True) -> np.ndarray:
    """Positive view for the contrastive phase: delete each token with probability ``rate``.

    The first token (BOS) is kept when ``keep_first``; at least one token always remains.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    keep = rng.random(tokens.shape[0]) >= rate
    if keep_first and tokens.shape[0]:
        keep[0] = True
    if not keep.any():
        keep[rng.integers(tokens.shape[0])] = True
    return tokens[keep]


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document start (along the last dim)."""
    L = doc_ids.shape[-1]
    idx = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    start_at = torch.where(doc_starts(doc_ids), idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_at, dim=-1).values


def next_token_labels(input_ids: torch.Tensor, roles: torch.Tensor, doc_ids: torch.Tensor, *, prefix_targets: bool = True) -> torch.Tensor:
    """Labels aligned with positions: labels[i] is the target of the prediction made at i.

    labels[i] = input_ids[i+1] if position i+1 is in the same (non-padding) document and is
    not a SPECIAL token; else IGNORE_INDEX. So special tokens are never targets, the last
    special token predicts the first suffix token, documents never predict each other, and
    padding (doc_id == PAD_DOC_ID) is never trained.

    ``prefix_targets=False`` (summary mode, see :func:`trains_prefix_targets`) also drops the
    predictions made at PREFIX positions: under the mask a prefix token sees only prefix tokens,
    so with a frozen base its prediction depends on no trainable parameter.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    valid = (doc_ids[..., 1:] == doc_ids[..., :-1]) & (roles[..., 1:] != Role.SPECIAL) & (doc_ids[..., :-1] != PAD_DOC_ID)
    if not prefix_targets:
        valid = valid & (roles[..., :-1] != Role.PREFIX)
    labels[..., :-1] = torch.where(valid, input_ids[..., 1:], torch.full_like(input_ids[..., 1:], IGNORE_INDEX))
    return labels


def trains_prefix_targets(config: GEMConfig) -> bool:
    """Whether the next-token loss keeps the predictions made at PREFIX positions. Full mode:
    yes (the paper trains the prefix too). Summary mode: no. The base model is frozen and the
    deltas act only at SPECIAL (+ SUFFIX) positions, which a prefix token never attends to, so
    a prefix prediction is a constant of training: it has no gradient, and counting it in the
    token mean would only shrink the gradient of the targets that do train by a factor that
    varies with the cut point. The loss is then the mean over the targets the adapter can move
    (the last summary token and the suffix)."""
    return not config.summary_mode
