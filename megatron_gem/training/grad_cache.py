"""Contrastive batches larger than memory: GradCache (Gao et al., 2021), shared by both engines.

``--contrastive-micro-batch-size C`` splits a contrastive micro-batch of N anchors (with their
positives and hard negatives) into chunks of C anchors (the chunk plan is data.datasets'
``chunk_spans``: the data set packs each chunk into its own rows, so it lives below here). One micro-batch then costs two passes:

1. every chunk is embedded WITHOUT a graph (the engine's forward under ``torch.no_grad``);
   ``embedding_grads`` computes the contrastive term (InfoNCE, or its mix with a teacher's KL:
   gem.losses.contrastive_loss; both are functions of the embeddings alone, the teacher's rows
   being constants) over the whole micro-batch from these embeddings (plus the cross-rank keys:
   the exact-gradient gather of common/distributed.py) and its gradient with respect to every
   chunk's embeddings and the logit scale;
2. every chunk is embedded again WITH a graph and ``surrogate_loss`` (emb . cached grad, plus
   scale . its grad once) is backpropagated: its parameter gradient is exactly the chunk's share
   of the full loss's, so the summed gradient equals the unchunked one while activation memory
   is that of C anchors.

Both passes must compute the same forward. The models have no dropout, but a chunk's second
forward still runs under the RNG state its first one saw (``RngSnapshot``), so anything random
in a forward (dropout a user turns on) repeats exactly.

Embeddings of a (chunk) batch are rows ``[anchors (n); positives (n); hard negatives (m)]``
(``gem.losses.split_embeddings``), the document order the contrastive data set lays out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..gem.losses import Distillation, GatherKeys, contrastive_loss, split_embeddings, zero_touch


@dataclass
class CachedGradients:
    """Result of pass 1 for one micro-batch."""

    loss: float  # the contrastive term over the whole micro-batch (unweighted)
    grads: list[torch.Tensor]  # d(weight x loss) / d(embeddings of chunk c), one per chunk
    scale_grad: torch.Tensor  # d(weight x loss) / d(logit scale)


def join_chunks(chunk_rows: list[torch.Tensor], counts: list[tuple[int, int]]):
    """(anchors, positives, hard negatives or None) of a micro-batch from its chunks' rows, each
    ``[anchors; positives; hard negatives]`` (``counts``: (anchors, hard negatives) per chunk):
    the micro-batch's own order, so the loss is the unchunked one."""
    parts = [split_embeddings(e, n, m) for e, (n, m) in zip(chunk_rows, counts)]
    negs = [p[2] for p in parts if p[2] is not None]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), (torch.cat(negs) if negs else None)


def embedding_grads(
    chunk_embs: list[torch.Tensor],
    counts: list[tuple[int, int]],
    scale: torch.Tensor,
    *,
    weight: float = 1.0,
    gather_keys: GatherKeys | None = None,
    teacher: list[torch.Tensor] | None = None,
    distill: Distillation | None = None,
) -> CachedGradients:
    """Pass 1's loss and gradients: the contrastive term (gem.losses.contrastive_loss: InfoNCE,
    or with ``teacher``, the teacher's rows of every chunk, its mix with the teacher's KL) of the
    micro-batch made of the chunks (``counts``: (anchors, hard negatives) per chunk),
    differentiated with respect to every chunk's embeddings and the scale. Collective when
    ``gather_keys`` gathers across ranks."""
    leaves = [e.detach().float().requires_grad_(True) for e in chunk_embs]
    s = scale.detach().float().requires_grad_(True)
    anchors, positives, negatives = join_chunks(leaves, counts)
    rows = join_chunks(teacher, counts) if teacher is not None else None
    with torch.enable_grad():
        loss = contrastive_loss(anchors, positives, s, negatives=negatives, gather_keys=gather_keys, teacher=rows, distill=distill)
        grads = torch.autograd.grad(loss * weight, [*leaves, s])
    return CachedGradients(float(loss.detach()), list(grads[:-1]), grads[-1])


def chunk_teacher_rows(chunks: list[dict]) -> list[torch.Tensor] | None:
    """The teacher's rows of every chunk (None when the batch has no teacher)."""
    rows = [c.get("teacher") for c in chunks]
    if all(r is None for r in rows):
        return None
    if any(r is None for r in rows):
        raise ValueError("some GradCache chunks carry the teacher's rows and some do not")
    return rows


def surrogate_loss(emb: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, scale_grad: torch.Tensor | None = None) -> torch.Tensor:
    """A scalar whose gradient with respect to the parameters is the cached one: sum(emb * grad)
    (+ scale * scale_grad for the one chunk that carries the scale's gradient). The scale always
    takes part (gem.losses.zero_touch elsewhere): ZeRO-3 wants every parameter in every forward."""
    out = (emb.float() * grad.to(emb.device)).sum()
    return out + (scale * scale_grad.to(scale.device) if scale_grad is not None else zero_touch(scale))


class RngSnapshot:
    """The random state a forward runs under: torch's CPU generator, the current CUDA device's,
    and megatron-core's tensor-parallel CUDA RNG tracker when megatron is in use. Taken before a
    chunk's first (no-grad) forward; ``restore`` before its second one."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.tracker = None
        tracker = _megatron_tracker()
        if tracker is not None:
            self.tracker = tracker.get_states()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        if self.tracker is not None:
            _megatron_tracker().set_states(self.tracker)


def _megatron_tracker():
    if "megatron.core.tensor_parallel.random" not in sys.modules:  # the DeepSpeed engine never imports it
        return None
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return tracker if getattr(tracker, "states_", None) else None
