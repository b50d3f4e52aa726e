"""Losses of the two GEM phases and their schedule (docs/method.md, "Losses")."""

from __future__ import annotations

import math
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
