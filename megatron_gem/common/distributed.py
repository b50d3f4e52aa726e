"""Ranks and the collectives GEM needs, for GPU clusters (NCCL) and CPU machines (gloo) alike;
engine-neutral (both engines, the megatron-core helpers and the integrations use them).

The one rule for collectives (docs/training.md, "Collectives"): every collective of the project
is a function of this module, and its tensors travel on the process group's communication
device (``comm_device``: the current CUDA device for NCCL, the CPU for gloo), whatever device
the caller's tensors are on; results come back on the caller's device. NCCL refuses a host
tensor ("No backend type associated with device type cpu"), so a collective that took the
caller's device as it came would crash GPU runs that CPU tests never see. Nothing else in the
package calls torch.distributed's collectives (tests/common/test_collectives.py checks)."""

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


# The device type each backend's collectives take their tensors on: what megatron-core assumes
# (torch.cuda.current_device() everywhere) and DeepSpeed asks its accelerator for. NCCL moves
# CUDA memory only; gloo moves host memory (it would take CUDA tensors through a host copy, but
# the CPU is its own). "cuda" means this process's current device (bind_local_device).
BACKEND_DEVICE: dict[str, str] = {"nccl": "cuda", "gloo": "cpu"}


def bind_local_device() -> torch.device:
    """This rank's compute device, made current: cuda:LOCAL_RANK (modulo the visible devices,
    for launchers that show each rank one GPU) when CUDA is there, else the CPU. The engines
    call it before creating their process groups: NCCL's object collectives and barrier use the
    current device, and two ranks left on cuda:0 would collide. Idempotent."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _current_cuda_device() -> torch.device:
    """The current CUDA device, refused when it is not the one torchrun, DeepSpeed, megatron-core
    and accelerate give this LOCAL_RANK (a rank that never bound its GPU talks on cuda:0)."""
    index = torch.cuda.current_device()
    local, count = os.environ.get("LOCAL_RANK"), torch.cuda.device_count()
    if local is not None and count > 1 and index != int(local) % count:
        raise RuntimeError(
            f"rank {rank()} (LOCAL_RANK {local}) would communicate on cuda:{index}, not on its own GPU cuda:{int(local) % count}: "
            "call megatron_gem.common.distributed.bind_local_device() (torch.cuda.set_device) before the first collective"
        )
    return torch.device("cuda", index)


def comm_device(group=None) -> torch.device:
    """The device every tensor of a collective over ``group`` (None: the default group) must be
    on, decided by the group's backend (BACKEND_DEVICE): the current CUDA device for NCCL, the
    CPU for gloo, the CPU when there is no process group. A group of several backends
    ("cpu:gloo,cuda:nccl") communicates on the CUDA device when CUDA is there."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    names = [part.split(":")[-1] for part in backend.split(",")]
    unknown = [n for n in names if n not in BACKEND_DEVICE]
    if unknown:
        raise ValueError(f"process group backend {backend!r}: the communication device is known for {sorted(BACKEND_DEVICE)} only (BACKEND_DEVICE)")
    kinds = [BACKEND_DEVICE[n] for n in names]
    kind = "cuda" if "cuda" in kinds and torch.cuda.is_available() else kinds[0]
    return _current_cuda_device() if kind == "cuda" else torch.device(kind)


def _on_comm_device(tensor: torch.Tensor, group) -> torch.Tensor:
    """A contiguous copy of ``tensor`` on ``group``'s communication device (a copy: in-place
    collectives must not change the caller's tensor)."""
    return tensor.contiguous().to(comm_device(group), copy=True)


def barrier(group=None) -> None:
    if dist.is_initialized():
        device = comm_device(group)
        dist.barrier(group=group, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``value`` over the ranks of ``group``, on ``value``'s device (``value`` itself
    without a process group); ``value`` is left unchanged."""
    if not dist.is_initialized():
        return value
    work = _on_comm_device(value, group)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(value.device)


def all_reduce_max(value: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise maximum of ``value`` over the ranks of ``group``, on ``value``'s device
    (``value`` itself without a process group); ``value`` is left unchanged."""
    if not dist.is_initialized():
        return value
    work = _on_comm_device(value, group)
    dist.all_reduce(work, op=dist.ReduceOp.MAX, group=group)
    return work.to(value.device)


def all_gather_tensors(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (one shape on all ranks), in rank order, on ``tensor``'s device."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [tensor]
    mine = _on_comm_device(tensor, group)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [p.to(tensor.device) for p in parts]


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable, small: error strings, manifest entries), in rank order.
    torch pickles it into a tensor on the current CUDA device under NCCL: comm_device checks
    that this rank's GPU is bound."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    comm_device(group)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def from_main(make, group=None):
    """``make()`` on global rank 0, its (picklable, small) result on every rank: e.g. a fresh
    temporary name only one rank may choose."""
    return all_gather_object(make() if rank() == 0 else None, group)[0]


def gather_object(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's ``obj`` in rank order on global rank ``dst``, None on the others."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    comm_device(group)
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
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
        padded = local
        if local.shape[0] < width:
            padded = torch.cat([padded, padded.new_zeros((width - local.shape[0], *local.shape[1:]))])
        parts = all_gather_tensors(padded, group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group)[ctx.start : ctx.stop], None, None


def _row_counts(local: torch.Tensor, group) -> list[int]:
    """Every rank's number of rows (hard negatives make them differ)."""
    return [int(p) for p in all_gather_tensors(torch.tensor([local.shape[0]], dtype=torch.int64), group)]


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
