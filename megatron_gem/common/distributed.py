"""Ranks and the collectives GEM needs, for GPU clusters (NCCL) and CPU machines (gloo) alike;
engine-neutral (both engines, the megatron-core helpers and the integrations use them)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def ensure_launcher_env() -> None:
    """Let a plain `python train.py` run as a one-process job (no mpi4py needed)."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for key, value in defaults.items():
            os.environ.setdefault(key, value)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print_main(*args) -> None:
    """print on rank 0 only (flushed: launchers interleave ranks' output)."""
    if is_main():
        print(*args, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable, small: error strings, manifest entries), in rank order."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice (all_reduce): the
    exact gradient of a loss that uses all ranks' keys. Uses only all_gather and all_reduce,
    which every backend (gloo included) supports."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def make_gather_keys(group=None):
    """An InfoNCE ``gather_keys`` hook over the data-parallel group (None: single process).

    Every rank must hold the same number of keys (the contrastive batch size is fixed).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None

    def gather(keys: torch.Tensor):
        return _GatherWithGrad.apply(keys, group), dist.get_rank(group) * keys.shape[0]

    return gather
