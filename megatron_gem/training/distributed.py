"""Process-group set-up and the collectives GEM needs, for GPU clusters and CPU (gloo) alike."""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist


def ensure_launcher_env() -> None:
    """Let a plain `python train.py` run as a one-process job (no mpi4py needed)."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for key, value in defaults.items():
            os.environ.setdefault(key, value)


def skip_deepspeed_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory comm op at first init (~2 min) that gloo
    does not need. Disable that build; GPU runs use NCCL and are untouched."""
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_deepspeed_distributed(timeout_minutes: int = 10) -> None:
    import datetime

    import deepspeed

    ensure_launcher_env()
    skip_deepspeed_shm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


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


class ExitSignalHandler:
    """Remembers that SIGUSR1/SIGTERM arrived; ``should_exit()`` asks every rank (any rank that
    got the signal stops them all at the same step)."""

    def __init__(self, enabled: bool, signals=("SIGUSR1", "SIGTERM")):
        import signal

        self.received: str | None = None
        if enabled:
            for name in signals:
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def should_exit(self) -> bool:
        flag = torch.tensor(1.0 if self.received else 0.0)
        return bool(all_reduce_sum(flag) > 0)


_exit_handler: ExitSignalHandler | None = None


def exit_signal_handler(enabled: bool) -> ExitSignalHandler:
    """The process's one ExitSignalHandler. train.py installs it before its heavy imports, so
    a signal that arrives during start-up is remembered too; engines then get the same one."""
    global _exit_handler
    if _exit_handler is None:
        _exit_handler = ExitSignalHandler(enabled)
    return _exit_handler
