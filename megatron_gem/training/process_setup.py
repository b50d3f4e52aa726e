"""Process-group set-up of the DeepSpeed engine and the pre-emption signal handler."""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from ..common.distributed import all_reduce_sum, bind_local_device, ensure_launcher_env


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
    bind_local_device()  # before the process group: NCCL's communicator belongs to this rank's GPU
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )


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
        """Collective: True on every rank when any rank got a signal."""
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
