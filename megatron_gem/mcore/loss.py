"""The loss of one megatron-core GEM micro-batch (last pipeline stage), used by train.py's
megatron engine (StepLoss) and by the Megatron-LM integration (GEMForwardStep).

Rows [:ntp_rows] carry next-token targets, rows [ntp_rows:] the 2N contrastive texts (anchor j,
positive N + j) and M hard negatives (docs 2N.., extra keys of every anchor). ``ntp_scale``: None gives the micro-batch's NTP token mean (Megatron-LM's
convention); a number multiplies the NTP *sum* instead (train.py: ``dp * accum /
global_tokens``, the token mean of the whole global batch after megatron-core's 1/accum and
data-parallel averaging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gem.losses import info_nce
from ..gem.readout import pool_special_states
from ..gem.roles import IGNORE_INDEX


@dataclass
class MicroBatchLoss:
    total: torch.Tensor  # what backward receives
    ntp: torch.Tensor | None = None  # NTP token mean of this micro-batch (detached)
    ntp_sum: float = 0.0
    ntp_tokens: int = 0
    cl: torch.Tensor | None = None  # InfoNCE (detached)
    tokens: int = 0  # non-padding tokens of the micro-batch


def contrastive_embeddings(batch: dict, states: torch.Tensor) -> torch.Tensor:
    """Summary embeddings [2N + M, H] (fp32) of the contrastive rows: anchors, positives, hard negatives."""
    n = batch["ntp_rows"]
    docs = 2 * batch["num_texts"] + int(batch.get("num_negatives", 0))
    return pool_special_states(states.float(), batch["roles"][n:], batch["doc_ids"][n:], docs)


def gem_micro_batch_loss(batch: dict, model, output, *, w_ntp: float, w_cl: float, gather_keys=None, ntp_scale: float | None = None) -> MicroBatchLoss:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, states = output
    n = batch["ntp_rows"]
    total = torch.zeros((), device=batch["input_ids"].device)
    out = MicroBatchLoss(total, tokens=int((batch["doc_ids"] >= 0).sum()))
    if n and w_ntp > 0:
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        per_token = vocab_parallel_cross_entropy(logits.float().contiguous(), labels.masked_fill(~keep, 0))
        ntp_sum = (per_token * keep).sum()
        count = keep.sum()
        ntp_mean = ntp_sum / count.clamp(min=1)
        total = total + (w_ntp * ntp_mean if ntp_scale is None else ntp_sum * ntp_scale)
        out.ntp, out.ntp_sum, out.ntp_tokens = ntp_mean.detach(), float(ntp_sum.detach()), int(count)
    elif n:
        total = total + 0.0 * logits.float().sum()  # keep the LM head in the graph
    if batch["num_texts"] and w_cl > 0:
        N, M = batch["num_texts"], int(batch.get("num_negatives", 0))
        emb = contrastive_embeddings(batch, states)
        cl = info_nce(emb[:N], emb[N : 2 * N], model.logit_scale(), gather_keys=gather_keys, negatives=emb[2 * N :] if M else None)
        total = total + w_cl * cl
        out.cl = cl.detach()
    elif states is not None:
        total = total + 0.0 * states.float().sum() + 0.0 * model.logit_scale()
    out.total = total
    return out
