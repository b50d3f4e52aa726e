"""One micro-batch's GEM loss, shared by the training engines.

NTP is a token mean over the whole global batch (all micro-batches, all data-parallel
ranks); engines average gradients over ranks and (DeepSpeed) divide by the number of
accumulation steps, so each micro-batch's sum is scaled by dp * accum / global_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gem.losses import info_nce, ntp_loss_sum
from ..gem.roles import IGNORE_INDEX


@dataclass
class MicroLoss:
    loss: torch.Tensor  # what backward() receives
    ntp_sum: float = 0.0  # summed NTP cross-entropy of this micro-batch
    ntp_tokens: int = 0
    cl_loss: float | None = None  # InfoNCE value (mean over this micro-batch's anchors)
    tokens: int = 0  # non-padding tokens processed


def ntp_micro_loss(model, batch: dict, *, global_tokens: int, dp_size: int, accum_steps: int, weight: float = 1.0) -> MicroLoss:
    total, count = ntp_loss_sum(model(batch, "ntp"), batch["labels"])
    scale = weight * dp_size * accum_steps / max(global_tokens, 1)
    return MicroLoss(
        loss=total * scale,
        ntp_sum=float(total.detach()),
        ntp_tokens=int(count),
        tokens=int((batch["doc_ids"] >= 0).sum()),
    )


def contrastive_micro_loss(model, batch: dict, *, gather_keys=None, weight: float = 1.0) -> MicroLoss:
    """InfoNCE between each anchor text (doc j < N) and its positive view (doc N + j)."""
    n = int(batch["num_texts"])
    emb, scale = model(batch, "embed")
    loss = info_nce(emb[:n], emb[n:], scale, gather_keys=gather_keys)
    return MicroLoss(loss=loss * weight, cl_loss=float(loss.detach()), tokens=int((batch["doc_ids"] >= 0).sum()))


def count_trained_tokens(batches: list[dict]) -> torch.Tensor:
    return sum((b["labels"] != IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)
