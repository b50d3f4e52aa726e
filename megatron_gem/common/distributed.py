"""Ranks and the collectives GEM needs, for GPU clusters (NCCL) and CPU machines (gloo) alike;
engine-neutral (both engines, the megatron-core helpers and the integrations use them)."""

from __future__ import annotations

import datetime
import os
import pickle

import torch
import torch.distributed as dist

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> str:
    """A TCP port free on this host now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def ensure_launcher_env() -> None:
    """Let a plain `python train.py` run as a one-process job (no mpi4py needed). Its rendezvous
    port is private (no peer has to know it): a fixed one would collide with any other one-process
    job on the host."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = free_port()


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
    exact gradient of a loss that uses all ranks' keys. Ranks may hold different numbers of
    rows (``sizes``, every rank's count): each part is padded to the largest for the
    all_gather and trimmed after. Uses only all_gather and all_reduce, which every backend
    (gloo included) supports."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, sizes: list[int]):
        ctx.group = group
        rank = dist.get_rank(group)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        width = max(sizes)
        padded = local.contiguous()
        if local.shape[0] < width:
            padded = torch.cat([padded, padded.new_zeros((width - local.shape[0], *local.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None


def _row_counts(local: torch.Tensor, group) -> list[int]:
    """Every rank's number of rows (hard negatives make them differ)."""
    mine = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


def make_gather_keys(group=None):
    """An InfoNCE ``gather_keys`` hook over the data-parallel group (None: single process).

    Ranks may hold different numbers of keys (records carry different numbers of hard
    negatives); the hook exchanges the counts first. Returns (all keys, offset of ours).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None

    def gather(keys: torch.Tensor):
        sizes = _row_counts(keys, group)
        return _GatherWithGrad.apply(keys, group, sizes), sum(sizes[: dist.get_rank(group)])

    return gather


# How long the other ranks wait for run_on_main's rank 0: tokenising a corpus can take longer
# than --distributed-timeout-minutes lets a collective wait; the job's time limit bounds it.
MAIN_WORK_TIMEOUT = datetime.timedelta(hours=24)


def run_on_main(fn, *, timeout: datetime.timedelta = MAIN_WORK_TIMEOUT):
    """Rank 0 runs ``fn()``; every rank returns its result (picklable). The others wait in a
    broadcast over a gloo group of its own whose timeout is ``timeout``, not the job's
    collective timeout. An exception of rank 0 is raised on every rank (the same type when it
    pickles, else RuntimeError with its message). Collective; one process: just ``fn()``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=timeout)
    error = None
    try:
        box = [None]
        if is_main():
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # every rank must hear of it, or they wait out the timeout
                error = e
                try:
                    pickle.dumps(e)
                    box[0] = ("error", e)
                except Exception:
                    box[0] = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    kind, value = box[0]
    if kind == "error":
        raise error if error is not None else value
    return value
