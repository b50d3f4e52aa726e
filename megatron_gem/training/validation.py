"""Validation during training, for both engines: --eval-iters global batches of held-out data
every --eval-interval steps and after the last step, forward only (engine.eval_step).

What is measured (one metrics.jsonl record, ``validation_record``):
  * next-token loss of held-out packed rows, a token mean, also apart for tokens of plain
    documents and of GEM-layout documents (a document whose piece holds a SPECIAL token);
  * the contrastive metric of the summary embeddings: InfoNCE (anchor -> positives, the
    training loss with the model's current logit scale) and in-batch top-1 accuracy (the
    anchor's own positive scores highest), the in-batch negatives being the whole global
    contrastive micro-batch (keys gathered over data-parallel ranks, as in training).
Everything is reduced as sums and counts over micro-batches and ranks (exact, not a mean of
means). The training run is untouched: no gradient, own data loaders restarted at sample 0 each
time, the RNG states restored after, the model back in train mode (the engine's eval_step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common import distributed as D
from ..gem.roles import IGNORE_INDEX, Role
from .checkpoint import rng_state, set_rng_state

# Order of the summed figures of one validation.
SUMS = ("ntp_plain_sum", "ntp_plain_tokens", "ntp_gem_sum", "ntp_gem_tokens", "cl_loss_sum", "cl_correct", "cl_texts")


@dataclass
class EvalParts:
    """What an engine's eval_step computes for one micro-batch (on ranks holding outputs)."""

    token_losses: torch.Tensor | None = (
        None  # [B, L] fp32 next-token cross-entropy of the NTP rows (any value where labels are ignored; the model's, without full logits)
    )
    anchors: torch.Tensor | None = None  # [N, H] summary embeddings of the anchors (not normalised)
    positives: torch.Tensor | None = None  # [N, H] of their positives
    logit_scale: float | None = None


def gem_layout_tokens(doc_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the token's document (piece) holds a SPECIAL token, i.e. is GEM-layout."""
    B, L = doc_ids.shape
    width = int(doc_ids.max().clamp(min=0)) + 1
    key = torch.arange(B, device=doc_ids.device)[:, None] * width + doc_ids.clamp(min=0)  # (row, document), unique per row
    has = torch.zeros(B * width, dtype=torch.bool, device=doc_ids.device)
    has[key[roles == Role.SPECIAL]] = True
    return has[key] & (doc_ids >= 0)


def ntp_sums(token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
    """float64 [4]: (plain loss sum, plain targets, GEM-layout loss sum, GEM-layout targets)."""
    labels = batch["labels"].to(token_losses.device)
    target = labels != IGNORE_INDEX
    gem = gem_layout_tokens(batch["doc_ids"].to(token_losses.device), batch["roles"].to(token_losses.device))
    losses = token_losses[:, : labels.shape[1]].double()
    plain_t, gem_t = target & ~gem, target & gem
    return torch.stack([(losses * plain_t).sum(), plain_t.sum().double(), (losses * gem_t).sum(), gem_t.sum().double()])


def contrastive_sums(anchors: torch.Tensor, positives: torch.Tensor, logit_scale: float, *, gather_keys=None) -> torch.Tensor:
    """float64 [3]: (summed InfoNCE over this rank's anchors, anchors whose own positive ranks
    first among all keys, anchors). Keys: every positive of the global micro-batch
    (``gather_keys``: the data-parallel gather; collective)."""
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    keys, offset = (p, 0) if gather_keys is None else gather_keys(p)
    scores = float(logit_scale) * a @ keys.T
    target = torch.arange(a.shape[0], device=a.device) + offset
    loss = F.cross_entropy(scores, target, reduction="sum")
    correct = (scores.argmax(dim=-1) == target).sum()
    return torch.stack([loss.double(), correct.double(), torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device)])


def validation_record(step: int, sums: torch.Tensor) -> dict:
    """metrics.jsonl record of a validation from the globally summed ``SUMS``; None where the
    held-out data had no such tokens / texts."""
    s = dict(zip(SUMS, (float(x) for x in sums)))

    def ratio(num: float, den: float):
        return num / den if den > 0 else None

    return {
        "step": step,
        "valid_ntp_loss": ratio(s["ntp_plain_sum"] + s["ntp_gem_sum"], s["ntp_plain_tokens"] + s["ntp_gem_tokens"]),
        "valid_ntp_loss_plain": ratio(s["ntp_plain_sum"], s["ntp_plain_tokens"]),
        "valid_ntp_loss_gem": ratio(s["ntp_gem_sum"], s["ntp_gem_tokens"]),
        "valid_ntp_tokens_plain": int(s["ntp_plain_tokens"]),
        "valid_ntp_tokens_gem": int(s["ntp_gem_tokens"]),
        "valid_cl_loss": ratio(s["cl_loss_sum"], s["cl_texts"]),
        "valid_cl_top1": ratio(s["cl_correct"], s["cl_texts"]),
        "valid_cl_texts": int(s["cl_texts"]),
    }


def micro_batch_sums(parts: EvalParts, ntp_batch: dict | None, *, gather_keys=None) -> torch.Tensor:
    """``SUMS`` of one micro-batch from an engine's EvalParts (on a rank holding outputs)."""
    out = torch.zeros(len(SUMS), dtype=torch.float64)
    if parts.token_losses is not None and ntp_batch is not None:
        out[:4] = ntp_sums(parts.token_losses, ntp_batch).cpu()
    if parts.anchors is not None:
        out[4:] = contrastive_sums(parts.anchors, parts.positives, parts.logit_scale, gather_keys=gather_keys).cpu()
    return out


class Validator:
    """``validator(step)`` -> the validation record (collective: every rank calls it)."""

    def __init__(self, engine, ntp_loader, cl_loader, *, eval_iters: int):
        self.engine, self.ntp_loader, self.cl_loader, self.eval_iters = engine, ntp_loader, cl_loader, int(eval_iters)
        self.accum = ntp_loader.num_microbatches
        self.gather_keys = D.make_gather_keys(engine.dp_group)

    def __call__(self, step: int) -> dict:
        saved = rng_state()
        self.ntp_loader.consumed_samples = self.cl_loader.consumed_samples = 0  # the same held-out batches every time
        ntp_iter, cl_iter = iter(self.ntp_loader), iter(self.cl_loader)
        sums = torch.zeros(len(SUMS), dtype=torch.float64)
        for _ in range(self.eval_iters):
            ntp = [next(ntp_iter) for _ in range(self.accum)]
            cl = [next(cl_iter) for _ in range(self.accum)]
            parts, reporter = self.engine.eval_step(ntp, cl)
            for part, batch in zip(parts, ntp):
                mine = micro_batch_sums(part, batch, gather_keys=self.gather_keys)  # every rank holding outputs gathers keys
                if reporter:
                    sums += mine
        sums = D.all_reduce_sum(sums)
        set_rng_state(saved)
        return validation_record(step, sums)
