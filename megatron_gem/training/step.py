"""Pieces of one optimizer step that both engines share: the NTP loss scale, the token count,
what an engine's step hands back (StepOutput), and the metrics.jsonl record built from it.

NTP is a token mean over the whole global batch (all micro-batches, all data-parallel ranks);
engines average gradients over ranks and divide by the number of accumulation steps, so each
micro-batch's sum is scaled by dp * accum / global_tokens (``ntp_loss_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common import distributed as D
from ..gem.losses import micro_batch_loss
from ..gem.roles import IGNORE_INDEX


def ntp_loss_scale(w_ntp: float, *, dp_size: int, accum_steps: int, global_tokens: int) -> float:
    return w_ntp * dp_size * accum_steps / max(global_tokens, 1)


def count_trained_tokens(batches: list[dict]) -> torch.Tensor:
    """Next-token targets (labels != IGNORE_INDEX) in ``batches``."""
    return sum((b["labels"] != IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)


@dataclass
class StepOutput:
    """What an engine's train_step returns: this rank's view of one optimizer step."""

    lr: float
    grad_norm: float | None
    reporter: bool  # this rank's losses count in the record (one rank per data-parallel replica)
    ntp_sums: list[float] = field(default_factory=list)  # summed NTP cross-entropy per micro-batch
    cl_values: list[float] = field(default_factory=list)  # InfoNCE per micro-batch
    tokens: int = 0  # non-padding tokens processed
    logit_scale: float | None = None
    local_losses: list = field(default_factory=list)  # every loss value this rank computed (non-finite check)


def step_record(step: int, out: StepOutput, *, w_ntp: float, w_cl: float, global_tokens: int, seconds: float) -> dict:
    """metrics.jsonl line of a step (the same fields in both engines), reduced over all ranks:
    NTP = summed cross-entropy / global tokens, InfoNCE = mean over the reporting ranks."""
    mine = out.reporter
    cls = out.cl_values if mine else []
    has_scale = mine and out.logit_scale is not None
    v = torch.tensor(
        [
            sum(out.ntp_sums) if mine else 0.0,
            (sum(cls) / len(cls)) if cls else 0.0,
            1.0 if cls else 0.0,
            float(out.tokens) if mine else 0.0,
            out.logit_scale if has_scale else 0.0,
            1.0 if has_scale else 0.0,
        ],
        dtype=torch.float64,
    )
    v = D.all_reduce_sum(v)
    ntp = float(v[0]) / global_tokens if w_ntp > 0 and global_tokens else None
    cl = float(v[1]) / float(v[2]) if w_cl > 0 and v[2] > 0 else None
    loss = (w_ntp * ntp if ntp is not None else 0.0) + (w_cl * cl if cl is not None else 0.0)
    return {
        "step": step + 1,
        "phase": 1 if w_cl == 0 else 2,
        "loss": loss,
        "ntp_loss": ntp,
        "cl_loss": cl,
        "lr": out.lr,
        "tokens_per_s": float(v[3]) / seconds,
        "logit_scale": float(v[4]) / float(v[5]) if v[5] > 0 else None,
        "grad_norm": float(out.grad_norm) if out.grad_norm is not None else None,
        "step_time_s": seconds,
    }


# --------------------------------------------------- micro-batch losses of the HF model (GEMModel)
@dataclass
class MicroLoss:
    loss: torch.Tensor  # what backward() receives
    ntp_sum: float = 0.0  # summed NTP cross-entropy of this micro-batch
    ntp_tokens: int = 0
    cl_loss: float | None = None  # the contrastive term (mean over this micro-batch's anchors)
    tokens: int = 0  # non-padding tokens processed


def ntp_micro_loss(model, batch: dict, *, scale: float) -> MicroLoss:
    """The NTP part of a micro-batch (gem.losses.micro_batch_loss of the model's per-token losses)."""
    part = micro_batch_loss(token_losses=model(batch, "ntp_losses"), labels=batch["labels"], ntp_scale=scale)
    return MicroLoss(loss=part.total, ntp_sum=float(part.ntp_sum), ntp_tokens=int(part.ntp_tokens), tokens=int((batch["doc_ids"] >= 0).sum()))


def contrastive_micro_loss(model, batch: dict, *, gather_keys=None, weight: float = 1.0, distill=None) -> MicroLoss:
    """InfoNCE between each anchor text (doc j < N) and its positive view (doc N + j), with the
    batch's hard negatives (docs 2N..) as extra keys; with the teacher's rows of the batch
    (``batch["teacher"]``, distill/teacher_rows.py) mixed with the teacher's KL by ``distill``
    (gem.losses.micro_batch_loss)."""
    emb, scale = model(batch, "embed")
    part = micro_batch_loss(
        w_ntp=0.0,
        w_cl=weight,
        embeddings=emb,
        logit_scale=scale,
        num_texts=int(batch["num_texts"]),
        num_negatives=int(batch.get("num_negatives", 0)),
        gather_keys=gather_keys,
        teacher=batch.get("teacher"),
        distill=distill,
    )
    return MicroLoss(loss=part.total, cl_loss=float(part.cl), tokens=int((batch["doc_ids"] >= 0).sum()))
