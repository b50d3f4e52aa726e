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


# Logit of a key left out of a distillation row: exp() of it is exactly 0 in fp32/fp64 next to
# any real logit (|logit| <= max logit scale or 1 / temperature), and a row with every key left
# out is uniform in both distributions, i.e. KL 0 with a zero gradient (no -inf, no NaN).
_LEFT_OUT = -1e9


@dataclass(frozen=True)
class Distillation:
    """How a teacher's similarity structure enters the contrastive term (docs/method.md,
    "Teacher distillation"): ``weight`` is the share of :func:`teacher_kl` in the contrastive
    loss (1: the teacher alone; below 1 the rest is InfoNCE on the batch's pairs),
    ``temperature`` the teacher's softmax temperature (the student uses its logit scale)."""

    weight: float = 1.0
    temperature: float = 0.05

    @classmethod
    def from_config(cls, config: GEMConfig) -> "Distillation":
        return cls(config.teacher_weight, config.teacher_temperature)


def teacher_kl(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    teacher_anchors: torch.Tensor,
    teacher_positives: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    temperature: float,
    negatives: torch.Tensor | None = None,
    teacher_negatives: torch.Tensor | None = None,
    gather_keys: GatherKeys | None = None,
) -> torch.Tensor:
    """Similarity distillation: mean over anchors i of KL(q_i || p_i), where over the keys j
    (positives, then hard negatives, of every data-parallel rank with ``gather_keys``: the
    keys InfoNCE scores)

        q_i = softmax_j(cos(teacher_anchor_i, teacher_key_j) / temperature)   (the target, no gradient)
        p_i = softmax_j(logit_scale * cos(anchor_i, key_j))                   (the student)

    ``teacher_*``: the teacher's embeddings of the same texts, row for row ([n, d_t], [m, d_t];
    d_t need not be the student's d). An anchor whose teacher rows of anchor and own positive
    are equal (the same text: self-supervised views) leaves its own positive out of its row,
    in both distributions: a text's similarity to itself (1) says nothing about the teacher's
    geometry and would turn the target into InfoNCE's one-hot one. Every other key counts.
    Collective when ``gather_keys`` gathers across ranks (student keys, then teacher keys)."""
    if teacher_anchors.shape[0] != anchors.shape[0] or teacher_positives.shape != teacher_anchors.shape:
        raise ValueError(f"teacher rows {tuple(teacher_anchors.shape)}, {tuple(teacher_positives.shape)} do not match {anchors.shape[0]} anchors")
    if (negatives is None) != (teacher_negatives is None) or (negatives is not None and teacher_negatives.shape[0] != negatives.shape[0]):
        raise ValueError("hard negatives need their teacher rows, one per negative")
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    a = F.normalize(anchors.to(dtype), dim=-1)
    local_keys = F.normalize(positives.to(dtype), dim=-1)
    if negatives is not None:
        local_keys = torch.cat([local_keys, F.normalize(negatives.to(dtype), dim=-1)])
    device = a.device
    ta, tp = teacher_anchors.to(device), teacher_positives.to(device)
    own = (ta == tp).all(dim=-1)  # [n]: the same text on both sides
    t_local = F.normalize(tp.to(dtype), dim=-1)
    if teacher_negatives is not None:
        t_local = torch.cat([t_local, F.normalize(teacher_negatives.to(device, dtype), dim=-1)])
    keys, offset = (local_keys, 0) if gather_keys is None else gather_keys(local_keys)
    t_keys = t_local if gather_keys is None else gather_keys(t_local)[0]
    n = a.shape[0]
    left_out = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=device)
    left_out[torch.arange(n, device=device), torch.arange(n, device=device) + offset] = own
    student = (logit_scale.to(dtype) * a @ keys.T).masked_fill(left_out, _LEFT_OUT)
    with torch.no_grad():
        target = ((F.normalize(ta.to(dtype), dim=-1) @ t_keys.T) / temperature).masked_fill(left_out, _LEFT_OUT)
        log_q = F.log_softmax(target, dim=-1)
    log_p = F.log_softmax(student, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()


def contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    gather_keys: GatherKeys | None = None,
    teacher: tuple | None = None,
    distill: Distillation | None = None,
) -> torch.Tensor:
    """The contrastive term of phase 2: InfoNCE (:func:`info_nce`), or with ``teacher`` (the
    teacher's rows of anchors, positives and hard negatives, as :func:`split_embeddings` gives)
    ``w x teacher_kl + (1 - w) x InfoNCE`` with ``w = distill.weight`` (InfoNCE not computed
    when w = 1). The one composition GradCache's first pass and every engine's loss use."""
    if teacher is None:
        return info_nce(anchors, positives, logit_scale, gather_keys=gather_keys, negatives=negatives)
    distill = distill or Distillation()
    t_anchors, t_positives, t_negatives = teacher
    kl = teacher_kl(
        anchors,
        positives,
        t_anchors,
        t_positives,
        logit_scale,
        temperature=distill.temperature,
        negatives=negatives,
        teacher_negatives=t_negatives,
        gather_keys=gather_keys,
    )
    if distill.weight >= 1.0:
        return kl
    nce = info_nce(anchors, positives, logit_scale, gather_keys=gather_keys, negatives=negatives)
    return distill.weight * kl + (1.0 - distill.weight) * nce


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
    cl: torch.Tensor | None = None  # the contrastive term (unweighted): InfoNCE, or with a teacher contrastive_loss's mix


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
    teacher: torch.Tensor | None = None,
    distill: Distillation | None = None,
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
    ``split_embeddings``) with ``logit_scale`` and ``gather_keys``, times ``w_cl``; with
    ``teacher`` (the teacher's rows of the same 2N + M texts, [2N + M, d_t], no gradient) the
    contrastive term is :func:`contrastive_loss`'s mix of ``distill`` (weight, temperature).
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
        rows = split_embeddings(teacher, num_texts, num_negatives) if teacher is not None else None
        cl = contrastive_loss(anchors, positives, logit_scale, negatives=negatives, gather_keys=gather_keys, teacher=rows, distill=distill)
        add(w_cl * cl)
        out.cl = cl.detach()
    elif embeddings is not None or logit_scale is not None:
        add(zero_touch(embeddings, logit_scale))
    out.total = total if total is not None else torch.zeros(())
    return out
