#!/usr/bin/env python
"""Peak memory of the next-token loss, forward + backward, at Llama-3-8B's head: vocabulary
128,256, hidden 4096, 8192 tokens per micro-batch, bf16. Before: the composition both engines
ran until the chunked loss (full logits ``hidden @ W^T`` in bf16, upcast to fp32,
``F.cross_entropy`` summed; gem.losses.ntp_loss_sum); after: gem.lm_head_loss's chunked loss
(its default block shape unless --chunk-*). Target: after < 1/4 of before.

How it is measured: every tensor is a fake tensor (torch's FakeTensorMode: shapes and dtypes
only, nothing computed, seconds at the real shape; CPU device by default, since a CPU build of
torch cannot run autograd on fake CUDA tensors, and the aten ops and their outputs are the
ones a GPU runs), and the memory estimator's dispatch mode (training/activation_memory.py
StorageTracker: one count for both tools) sums the bytes of the storages ops create while they
are alive (weak references drop them when freed): the peak of that sum over the forward and
backward, above the inputs (hidden, head weight, labels), gradients included (grad_hidden,
grad_W: the same in both). This counts what the code keeps alive, not the caching allocator's rounding and
fragmentation (which a real GPU adds on top of both). ``--real`` runs real tensors instead
(small shapes only), as a check of the count.
Last line: one JSON object.

    python tools/bench_loss.py                         # the 8B head, fake tensors
    python tools/bench_loss.py --tokens 256 --vocab 3000 --hidden 64 --real
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_gem.training.activation_memory import StorageTracker  # noqa: E402


def before(hidden, weight, labels):
    """The composition until the chunked loss: GEMModel's head(hidden), then ntp_loss_sum."""
    from megatron_gem.gem.losses import ntp_loss_sum

    total, _ = ntp_loss_sum(hidden @ weight.T, labels)
    return total


def after(hidden, weight, labels, chunk_tokens=None, chunk_vocab=None):
    from megatron_gem.gem.lm_head_loss import lm_head_token_losses

    return lm_head_token_losses(hidden, weight, labels, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab).sum()


def measure(loss_fn, *, tokens, vocab, hidden_size, dtype, device, real) -> dict:
    """Peak live bytes (above the inputs) of loss_fn's forward and backward, and the loss."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=False)
    with fake:
        if real:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(tokens, hidden_size, generator=g).to(device=device, dtype=dtype)
            weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device=device, dtype=dtype)
            labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        else:
            hidden = torch.empty(tokens, hidden_size, device=device, dtype=dtype)
            weight = torch.empty(vocab, hidden_size, device=device, dtype=dtype)
            labels = torch.zeros(tokens, device=device, dtype=torch.long)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        tracker = StorageTracker()  # the estimator's count (training/activation_memory.py): the inputs, made before, are not in it
        with tracker:
            loss = loss_fn(hidden, weight, labels)
            forward_peak = tracker.peak
            loss.backward()
        value = float(loss.detach()) if real else None
        grads_alive = tracker.current  # grad_hidden + grad_W (+ the loss scalar)
        del loss
    return {"peak_bytes": tracker.peak, "forward_peak_bytes": forward_peak, "grads_bytes": grads_alive, "loss": value}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="peak memory of the NTP loss, before (full logits) and after (chunked)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cpu", help="device of the tensors (fake CUDA tensors need a CUDA build of torch for autograd)")
    ap.add_argument("--real", action="store_true", help="real tensors (computes; small shapes only) instead of fake ones")
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--chunk-vocab", type=int, default=None)
    args = ap.parse_args(argv)
    if args.real and args.tokens * args.vocab > 1 << 28:
        ap.error(f"--real computes the full logits: {args.tokens} x {args.vocab} is too large; drop --real (fake tensors) or shrink the shape")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = dict(tokens=args.tokens, vocab=args.vocab, hidden_size=args.hidden, dtype=dtype, device=args.device, real=args.real)
    old = measure(before, **shape)
    new = measure(lambda h, w, y: after(h, w, y, args.chunk_tokens, args.chunk_vocab), **shape)
    gib = 1 << 30
    print(
        f"NTP loss forward+backward, {args.tokens} tokens x vocabulary {args.vocab} x hidden {args.hidden}, {args.dtype}, {args.device} ({'real' if args.real else 'fake'} tensors)"
    )
    for name, m in (("before (full logits)", old), ("after (chunked)", new)):
        print(
            f"  {name:22s} peak {m['peak_bytes'] / gib:7.3f} GiB (forward {m['forward_peak_bytes'] / gib:.3f} GiB; gradients alive after: {m['grads_bytes'] / gib:.3f} GiB)"
        )
    ratio = new["peak_bytes"] / old["peak_bytes"]
    print(f"  after / before = {ratio:.3f} (target < 0.25)")
    result = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "device": args.device,
        "tensors": "real" if args.real else "fake",
        "before_peak_bytes": old["peak_bytes"],
        "after_peak_bytes": new["peak_bytes"],
        "before_forward_peak_bytes": old["forward_peak_bytes"],
        "after_forward_peak_bytes": new["forward_peak_bytes"],
        "gradient_bytes": new["grads_bytes"],
        "ratio": ratio,
        "before_loss": old["loss"],
        "after_loss": new["loss"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
