"""megatron-core process groups and seeds, on GPU clusters (NCCL) and CPU machines (gloo)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init_model_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234, timeout_minutes: int = 10) -> None:
    """torch.distributed (from the launcher's env; a plain one-process run needs none) and
    megatron-core's TP/PP/DP groups; CPU shims when there is no GPU; model-parallel seeds."""
    from megatron.core import parallel_state, tensor_parallel

    from ..common.distributed import bind_local_device, ensure_launcher_env
    from . import cpu_shims

    ensure_launcher_env()
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_shims.apply()
    if not dist.is_initialized():
        bind_local_device()  # before the process group: NCCL's communicator belongs to this rank's GPU
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline parallel size {tp} x {pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=not cuda,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
