"""Losses of the two GEM phases and their schedule (docs/method.md, "Losses"), and
``micro_batch_loss``: their composition for one micro-batch, the one every engine, integration
and validation path calls (with ``zero_touch``, the one way a loss keeps an unused trainable
tensor in the graph)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GEMConfig
from .roles import IGNORE_INDEX


def ntp_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of trained tokens.

    logits [..., L, V], labels [..., L] already aligned (labels[i] is the target at i; see
    gem.layout.next_token_labels). Computed in fp32. Returning (sum, count) instead of a mean
    keeps the loss a true token mean under packing, padding and gradient accumulation: divide
    the sum by the token count of the whole global batch (see :func:`ntp_loss`).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    total = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (target != IGNORE_INDEX).sum()


def ntp_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean NTP loss. ``num_tokens``: the trained-token count of the whole global batch
    (all micro-batches and data-parallel ranks) so that summing the returned values over
    micro-batches (and averaging gradients over ranks times world size) gives the exact mean;
    defaults to this micro-batch's own count."""
    total, count = ntp_loss_sum(logits, labels)
    denom = count if num_tokens is None else num_tokens
    return total / torch.as_tensor(denom, dtype=total.dtype, device=total.device).clamp(min=1)


class LogitScale(torch.nn.Module):
    """Learnable InfoNCE temperature: scale = exp(lambda), lambda clamped to [0, log max]."""

    def __init__(self, init: float = 20.0, max_scale: float = 100.0):
        super().__init__()
        if not 1.0 <= init <= max_scale:
            raise ValueError(f"logit scale init {init} must lie in [1, {max_scale}]")
        self.log_max = math.log(max_scale)
        # Shape [1], not a 0-d scalar: ZeRO-3 partitions parameters by flattening them.
        self.log_scale = torch.nn.Parameter(torch.tensor([math.log(init)], dtype=torch.float32))

    @classmethod
    def from_config(cls, config: GEMConfig) -> "LogitScale":
        return cls(config.logit_scale_init, config.logit_scale_max)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, self.log_max).exp().squeeze(0)


# Gathers keys from all data-parallel ranks: takes the local keys [n, d] and returns
# (all keys [N, d] with gradient flowing back to the local part, offset of the local keys in N).
GatherKeys = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather_keys: GatherKeys | None = None,
    symmetric: bool = False,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over L2-normalised embeddings: mean_i -log softmax_j(s * cos(a_i, k_j))[i].

    anchors, positives [n, d] (row i of each is a pair). Keys k: the batch's positives, then
    its hard ``negatives`` [m, d] if given (m may be 0 or differ between ranks), and with
    ``gather_keys`` the keys (positives and hard negatives) of every data-parallel rank. So a
    hard negative counts against every anchor, as in sentence-transformers'
    MultipleNegativesRankingLoss. ``symmetric`` also adds the positives -> anchors direction
    (averaged; hard negatives take no part in it).
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must be equal [n, d]")
    if negatives is not None and (negatives.dim() != 2 or negatives.shape[1] != anchors.shape[1]):
        raise ValueError(f"negatives {tuple(negatives.shape)} must be [m, {anchors.shape[1]}]")
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    local_keys = p if negatives is None else torch.cat([p, F.normalize(negatives.float(), dim=-1)])
    keys, offset = (local_keys, 0) if gather_keys is None else gather_keys(local_keys)
    target = torch.arange(a.shape[0], device=a.device) + offset
    loss = F.cross_entropy(logit_scale * a @ keys.T, target)
    if symmetric:
        akeys, aoffset = (a, 0) if gather_keys is None else gather_keys(a)
        loss = 0.5 * (loss + F.cross_entropy(logit_scale * p @ akeys.T, torch.arange(p.shape[0], device=p.device) + aoffset))
    return loss


def loss_weights(step: int, config: GEMConfig) -> tuple[float, float]:
    """(weight of NTP, weight of contrastive) at ``step`` (0-based).

    Phase 1 (step < contrastive_from_step): (1, 0). Phase 2: (1 - alpha, alpha).
    """
    if step < config.contrastive_from_step:
        return 1.0, 0.0
    return 1.0 - config.alpha, config.alpha


def split_embeddings(emb: torch.Tensor, num_texts: int, num_negatives: int = 0):
    """(anchors [n, d], positives [n, d], hard negatives [m, d] or None) of a contrastive batch's
    embeddings: rows ``[anchors (n); positives (n); hard negatives (m)]``, the document order the
    contrastive data set lays out."""
    n, m = int(num_texts), int(num_negatives)
    if emb.shape[0] != 2 * n + m:
        raise ValueError(f"{emb.shape[0]} embeddings, expected 2 x {n} texts + {m} hard negatives")
    return emb[:n], emb[n : 2 * n], (emb[2 * n :] if m else None)


def zero_touch(*values: torch.Tensor | None) -> torch.Tensor:
    """A 0-valued fp32 scalar that depends on every given tensor (None skipped): added to a loss,
    autograd hands each of them, and the trainable parameters behind them, a zero gradient.

    Why: ZeRO-3 keeps a stale gradient for a parameter a step did not use (the LM head in the
    contrastive phase, the logit scale in phase 1, summary-mode deltas on a batch without summary
    tokens), which leaks into the grad norm and the update and breaks exact resume; DDP-style
    engines need every parameter in every step's graph too. Pass values computed through the
    owning modules' forwards (e.g. ``head(hidden[:1, :1])``), not ZeRO-3 parameters themselves.
    One element of each value is read (no reduction over logits-sized tensors), and a
    non-finite element gives 0, not NaN."""
    total = None
    for v in values:
        if v is None:
            continue
        first = v
        for d in range(v.dim()):
            first = first.narrow(d, 0, min(1, v.shape[d]))  # a view of at most one element
        term = torch.nan_to_num(first.float(), nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@dataclass
class MicroBatchLoss:
    """One micro-batch's loss: ``total`` is what backward receives; the rest is detached."""

    total: torch.Tensor
    ntp_sum: torch.Tensor | None = None  # summed NTP cross-entropy (fp32)
    ntp_tokens: torch.Tensor | None = None  # its target count
    ntp: torch.Tensor | None = None  # its token mean (or the NTP value given)
    cl: torch.Tensor | None = None  # InfoNCE (unweighted)


def micro_batch_loss(
    *,
    w_ntp: float = 1.0,
    w_cl: float = 0.0,
    token_losses: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ntp_scale: float | None = None,
    ntp: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    num_texts: int = 0,
    num_negatives: int = 0,
    gather_keys: GatherKeys | None = None,
    touch: tuple = (),
) -> MicroBatchLoss:
    """GEM's loss of one micro-batch, either phase, for every engine and integration:
    ``w_ntp x NTP + w_cl x InfoNCE``, plus ``zero_touch`` of ``touch`` and of any term left out.

    NTP, from per-token cross-entropy ``token_losses`` (any value where ``labels`` is
    IGNORE_INDEX; e.g. gem.lm_head_loss.lm_head_token_losses): its sum times ``ntp_scale``
    (train.py: ``w_ntp x dp x accum / global tokens``, so the global batch's token mean comes out
    after the engines' averaging), or with ``ntp_scale`` None the micro-batch's token mean times
    ``w_ntp``. Or ``ntp``: a token mean computed elsewhere (the HF model's own loss), times ``w_ntp``.
    InfoNCE over ``embeddings`` [2N + M, d] (anchors, positives, hard negatives; see
    ``split_embeddings``) with ``logit_scale`` and ``gather_keys``, times ``w_cl``.
    A term whose weight is 0 is not computed; its inputs are touched instead."""
    total = zero_touch(*touch) if touch else None
    out = MicroBatchLoss(total=None)

    def add(term: torch.Tensor) -> None:
        nonlocal total
        total = term if total is None else total + term

    if token_losses is not None and (w_ntp > 0 or (ntp_scale or 0.0) != 0.0):
        keep = labels != IGNORE_INDEX
        ntp_sum = torch.where(keep, token_losses.float(), 0.0).sum()
        count = keep.sum()
        mean = ntp_sum / count.clamp(min=1)
        add(w_ntp * mean if ntp_scale is None else ntp_sum * ntp_scale)
        out.ntp_sum, out.ntp_tokens, out.ntp = ntp_sum.detach(), count, mean.detach()
    elif token_losses is not None:
        add(zero_touch(token_losses))
    if ntp is not None:
        add(w_ntp * ntp)
        out.ntp = ntp.detach()
    if embeddings is not None and num_texts and w_cl > 0:
        anchors, positives, negatives = split_embeddings(embeddings, num_texts, num_negatives)
        cl = info_nce(anchors, positives, logit_scale, gather_keys=gather_keys, negatives=negatives)
        add(w_cl * cl)
        out.cl = cl.detach()
    elif embeddings is not None or logit_scale is not None:
        add(zero_touch(embeddings, logit_scale))
    out.total = total if total is not None else torch.zeros(())
    return out
