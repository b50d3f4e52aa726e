"""The loss of one megatron-core GEM micro-batch (last pipeline stage), used by train.py's
megatron engine (StepLoss, EvalForward) and by the Megatron-LM integration (GEMForwardStep);
the composition itself is gem.losses.micro_batch_loss, every engine's.

Rows [:ntp_rows] carry next-token targets, rows [ntp_rows:] the 2N contrastive texts (anchor j,
positive N + j) and M hard negatives (docs 2N.., extra keys of every anchor). ``ntp_scale``: None gives the micro-batch's NTP token mean (Megatron-LM's
convention); a number multiplies the NTP *sum* instead (train.py: ``dp * accum /
global_tokens``, the token mean of the whole global batch after megatron-core's 1/accum and
data-parallel averaging).

The next-token cross-entropy never materialises logits: ``GEMGPTModel.forward(..., labels=)``
runs ``vocab_parallel_token_losses`` (gem/lm_head_loss.py through the vocabulary-parallel
output layer) and hands per-token losses [n, L] to the loss function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gem.lm_head_loss import lm_head_token_losses
from ..gem.losses import micro_batch_loss
from ..gem.readout import pool_special_states


@dataclass
class MicroBatchLoss:
    total: torch.Tensor  # what backward receives
    ntp: torch.Tensor | None = None  # NTP token mean of this micro-batch (detached)
    ntp_sum: float = 0.0
    ntp_tokens: int = 0
    cl: torch.Tensor | None = None  # the contrastive term (detached): InfoNCE, or its mix with the teacher's KL
    tokens: int = 0  # non-padding tokens of the micro-batch


def contrastive_embeddings(batch: dict, states: torch.Tensor) -> torch.Tensor:
    """Summary embeddings [2N + M, H] (fp32) of the contrastive rows: anchors, positives, hard negatives."""
    n = batch["ntp_rows"]
    docs = 2 * batch["num_texts"] + int(batch.get("num_negatives", 0))
    return pool_special_states(states.float(), batch["roles"][n:], batch["doc_ids"][n:], docs)


def _tensor_parallel_all_reduce(group):
    from ..common import distributed as D

    ops = {"max": D.all_reduce_max, "sum": D.all_reduce_sum}
    return lambda t, op: ops[op](t, group)


def vocab_parallel_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    true_vocab_size: int,
    sequence_parallel: bool,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> torch.Tensor:
    """Per-token next-token cross-entropy [n, L] (fp32, 0 where ignored) of the output layer's
    vocabulary shard ``weight`` [V_pad / TP, H] on the last-layer states ``hidden`` [L, n, H]
    ([L / TP, n, H] under sequence parallelism), ``labels`` [n, L]. The states enter the tensor-
    parallel region as ColumnParallelLinear's input does (copied, or gathered from the sequence
    shards), so their gradient is all-reduced (reduce-scattered) over TP exactly as the head's
    would be; the softmax statistics are all-reduced over TP inside the loss. Padded vocabulary
    rows (ids >= ``true_vocab_size``) take no part. ``chunk_*``: the block shape (gem.lm_head_loss)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel and tp > 1:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    all_reduce = _tensor_parallel_all_reduce(parallel_state.get_tensor_model_parallel_group()) if tp > 1 else None
    start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    losses = lm_head_token_losses(
        hidden, weight, labels.t(), vocab_start=start, vocab_limit=true_vocab_size, all_reduce=all_reduce, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab
    )
    return losses.t()


def gem_micro_batch_loss(
    batch: dict, model, output, *, w_ntp: float, w_cl: float, gather_keys=None, ntp_scale: float | None = None, distill=None
) -> MicroBatchLoss:
    """``output``: what ``GEMGPTModel.forward(..., labels=batch["labels"])`` returned, i.e.
    (per-token NTP losses [n, L] or None, contrastive states [B - n, L, H] or None). A batch
    with the teacher's rows of its texts (``batch["teacher"]``, distill/teacher_rows.py) adds the
    teacher's term to the contrastive one (``distill``: gem.losses.Distillation)."""
    token_losses, states = output
    n = batch["ntp_rows"]
    if token_losses is not None and token_losses.dim() != 2:
        raise ValueError(f"gem_micro_batch_loss takes per-token losses [n, L], got {tuple(token_losses.shape)}: call the model with labels=batch['labels']")
    has_cl = bool(batch["num_texts"]) and states is not None
    part = micro_batch_loss(
        w_ntp=w_ntp,
        w_cl=w_cl,
        token_losses=token_losses if n else None,
        labels=batch["labels"],
        ntp_scale=ntp_scale,
        embeddings=contrastive_embeddings(batch, states) if has_cl and w_cl > 0 else None,
        logit_scale=model.logit_scale() if states is not None else None,  # touched only where contrastive rows ran
        num_texts=batch["num_texts"],
        num_negatives=int(batch.get("num_negatives", 0)),
        gather_keys=gather_keys,
        teacher=batch.get("teacher") if has_cl else None,
        distill=distill,
        touch=(states,) if states is not None and not (has_cl and w_cl > 0) else (),
    )
    out = MicroBatchLoss(part.total.to(batch["input_ids"].device), tokens=int((batch["doc_ids"] >= 0).sum()))
    if part.ntp_sum is not None:
        out.ntp, out.ntp_sum, out.ntp_tokens = part.ntp, float(part.ntp_sum), int(part.ntp_tokens)
    out.cl = part.cl
    return out
