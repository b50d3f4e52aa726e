"""Next-token cross-entropy through the LM head without a [tokens, vocabulary] logits tensor.

``lm_head_token_losses(hidden, weight, labels)`` equals
``F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none", ignore_index=-100)``
(``reference_lm_head_token_losses``, what both engines computed before: full logits in the
model dtype, upcast to fp32, log-softmax, all kept for backward). At Llama-3's 128,256-token
vocabulary and 8k tokens that reference holds ~2 GB of bf16 logits and three fp32 copies of
4 GB each; this one holds one block of logits at a time and recomputes it in backward.

How (the design of Liger-Kernel's fused linear cross-entropy and Megatron's vocab-parallel
cross-entropy, written in plain torch so it runs on CPU and under FakeTensorMode too; Liger is
Triton/GPU-only):

* forward: for each block of ``chunk_vocab`` vocabulary rows and ``chunk_tokens`` tokens, the
  logits ``h @ W_block^T`` in the model dtype (the GEMM the head runs), upcast to fp32, folded
  into a running per-token max and sum of exponentials (online log-sum-exp) and the target
  logit; only the per-token log-sum-exp (fp32, [tokens]) is kept for backward;
* backward: the same blocks again: softmax ``exp(z - lse)`` minus the one-hot target, times the
  incoming per-token gradient, cast to the model dtype (as autograd casts the reference's fp32
  logit gradient), then ``grad_hidden += d @ W_block`` and ``grad_W_block += d^T @ h``. Both
  sums run in fp32 and are cast once, so each gradient element carries the rounding of
  bf16 partial products only, like the reference's single GEMM, not a bf16 running sum;
* vocabulary-parallel (megatron-core's ColumnParallelLinear head): ``weight`` is this rank's
  shard of rows ``[vocab_start, vocab_start + V_local)``; ``all_reduce`` combines the per-token
  max, then the rescaled sum of exponentials and the target logit, over the shard group (two
  collectives per call, on [tokens] vectors). Backward needs no collective here: the caller's
  region function (copy-to / gather-from the tensor-parallel region) reduces grad_hidden;
* padding rows (``vocab_limit``: global ids at and beyond it) get logit -inf: they take no
  part in the softmax and get a zero gradient; blocks made only of padding are skipped.

The head has no bias (Llama / Mistral). Ignored targets (``IGNORE_INDEX``) give loss 0 and no
gradient; a target at or beyond ``vocab_limit`` gives an infinite loss, as the reference does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .roles import IGNORE_INDEX

# All-reduce over the vocabulary-parallel group: (tensor, "max" | "sum") -> the reduced tensor.
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]

# Block shape defaults: 4096 vocabulary rows x up to 2^26 / 4096 = 16384 tokens, i.e. at most
# 256 MiB of fp32 logits at a time (plus their model-dtype GEMM output), whatever the batch.
CHUNK_VOCAB = 4096
BLOCK_ELEMENTS = 1 << 26


def block_shape(tokens: int, vocab: int, chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> tuple[int, int]:
    """(tokens, vocabulary rows) of one block: the given sizes, else the defaults above."""
    vb = int(chunk_vocab) if chunk_vocab else min(max(vocab, 1), CHUNK_VOCAB)
    tc = int(chunk_tokens) if chunk_tokens else max(1, BLOCK_ELEMENTS // vb)
    if vb < 1 or tc < 1:
        raise ValueError(f"block sizes must be >= 1, got chunk_tokens={chunk_tokens}, chunk_vocab={chunk_vocab}")
    return min(tc, max(tokens, 1)), vb


def _real_rows(vocab_rows: int, vocab_start: int, vocab_limit: int | None) -> int:
    """Rows of this shard below ``vocab_limit`` (the rest are padding)."""
    if vocab_limit is None:
        return vocab_rows
    return max(0, min(vocab_rows, vocab_limit - vocab_start))


def _block_logits(h: torch.Tensor, w: torch.Tensor, real: int) -> torch.Tensor:
    """fp32 logits [c, b] of tokens ``h`` against rows ``w``; columns >= ``real`` are -inf."""
    z = (h @ w.T).float()
    if real < z.shape[1]:
        z[:, real:] = float("-inf")
    return z


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tc: int, vb: int, vocab_start: int, vocab_limit, all_reduce):
        T, V = hidden.shape[0], weight.shape[0]
        real = _real_rows(V, vocab_start, vocab_limit)
        keep = labels != IGNORE_INDEX
        local = labels - vocab_start  # the target's row in this shard
        here = keep & (local >= 0) & (local < V)
        m = torch.full((T,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        for c0 in range(0, real, vb):
            w = weight[c0 : min(c0 + vb, V)]
            for t0 in range(0, T, tc):
                t1 = min(t0 + tc, T)
                z = _block_logits(hidden[t0:t1], w, real - c0)
                col = local[t0:t1] - c0
                hit = here[t0:t1] & (col >= 0) & (col < w.shape[0])
                picked = z.gather(1, col.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
                target[t0:t1] += torch.where(hit, picked, 0.0)
                new_m = torch.maximum(m[t0:t1], z.max(dim=1).values)
                s[t0:t1] = s[t0:t1] * torch.exp(m[t0:t1] - new_m) + z.sub_(new_m[:, None]).exp_().sum(dim=1)
                m[t0:t1] = new_m
                del z
        if all_reduce is not None:
            # A shard of padding only has m = -inf and s = 0: exp(-inf - M) = 0 keeps it out.
            gm = all_reduce(m, "max")
            both = all_reduce(torch.stack([s * torch.exp(m - gm), target]), "sum")
            s, target, m = both[0], both[1], gm
        lse = m + s.log()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.block = (tc, vb, vocab_start, vocab_limit)
        return torch.where(keep, lse - target, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        tc, vb, vocab_start, vocab_limit = ctx.block
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T, V = hidden.shape[0], weight.shape[0]
        real = _real_rows(V, vocab_start, vocab_limit)
        keep = labels != IGNORE_INDEX
        local = labels - vocab_start
        here = keep & (local >= 0) & (local < V)
        g = torch.where(keep, grad_losses.float(), 0.0)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # padding rows keep 0
        direct = weight.dtype == torch.float32  # accumulate straight into grad_w
        for c0 in range(0, real, vb):
            w = weight[c0 : min(c0 + vb, V)]
            acc = None
            if want_w:  # fp32 sum of this block's per-chunk products, cast once
                acc = grad_w[c0 : c0 + w.shape[0]] if direct else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for t0 in range(0, T, tc):
                t1 = min(t0 + tc, T)
                h = hidden[t0:t1]
                z = _block_logits(h, w, real - c0)
                z.sub_(lse[t0:t1, None]).exp_().mul_(g[t0:t1, None])  # softmax x upstream gradient
                col = local[t0:t1] - c0
                hit = here[t0:t1] & (col >= 0) & (col < w.shape[0])
                z.scatter_add_(1, col.clamp(0, w.shape[0] - 1)[:, None], torch.where(hit, -g[t0:t1], 0.0)[:, None])  # minus the one-hot
                d = z.to(weight.dtype)
                del z
                if want_h:
                    grad_h[t0:t1] += d @ w
                if want_w:
                    acc += d.T @ h
            if want_w and not direct:
                grad_w[c0 : c0 + w.shape[0]] = acc
        return (grad_h.to(hidden.dtype) if want_h else None), grad_w, None, None, None, None, None, None


def lm_head_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    vocab_start: int = 0,
    vocab_limit: int | None = None,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """Per-token next-token cross-entropy (fp32, ``labels``' shape, 0 where ignored) of the LM
    head ``weight`` [V, H] on ``hidden`` [..., H] (the last-layer states, already aligned with
    ``labels``: labels[i] is the target at i), without the full logits; exact gradients for
    ``hidden`` and ``weight``. ``vocab_start`` / ``all_reduce``: ``weight`` is one shard of a
    vocabulary-parallel head (see the module docstring). ``vocab_limit``: ids at and beyond it are
    padding rows (never in the softmax). ``chunk_tokens`` x ``chunk_vocab``: the block shape
    (default ``block_shape``)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on all but the last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"LM head weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}]")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    tc, vb = block_shape(flat_h.shape[0], weight.shape[0], chunk_tokens, chunk_vocab)
    out = _LMHeadCrossEntropy.apply(flat_h, weight, flat_y, tc, vb, int(vocab_start), vocab_limit, all_reduce)
    return out.view(labels.shape)


def reference_lm_head_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, vocab_limit: int | None = None) -> torch.Tensor:
    """The obvious computation ``lm_head_token_losses`` must equal: the full logits in the model
    dtype (padding columns -inf), upcast to fp32, cross-entropy per token (0 where ignored)."""
    logits = hidden @ weight.T
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_limit, float("-inf"))
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(labels.shape)
