"""The few patches megatron-core 0.16 needs to train on CPU (gloo). Active only without a GPU.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math:
device queries (``torch.cuda.current_device()``/``synchronize()``), the model-parallel RNG
tracker (CUDA generator state), ``.cuda()`` moves, and literal ``device="cuda"`` in small
bookkeeping tensors (token counters in the pipeline schedules, norms and flags in the
optimizer, exchange buffers in dist_checkpointing). On a machine without CUDA every one of
those raises, so each patch below only replaces a call that would otherwise fail:

  torch.cuda.current_device      -> "cpu" (used as a ``device=`` argument)
  torch.cuda.synchronize         -> no-op
  torch.cuda RNG state / seeding -> the CPU generator (the "current device" generator here)
  megatron's _get/_set_cuda_rng_state (RNG tracker, recomputation) -> the CPU generator
  Tensor.cuda()                  -> the tensor itself (already on the only device)
  Tensor.type() called from megatron.core -> the CUDA type name ("torch.cuda.FloatTensor");
                                    the optimizer accepts only those names
  ``torch`` seen by the megatron modules listed in _CUDA_LITERAL_MODULES -> a proxy that maps
                                    device="cuda" to CPU in tensor factories

``apply()`` is idempotent and does nothing when ``torch.cuda.is_available()``: GPU runs use
megatron-core untouched. Nothing here changes numerics.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import torch

_applied = False
_REAL_TORCH = torch

# megatron-core modules with literal device="cuda" tensor factories on the code paths GEM
# training uses (schedules, p2p, DDP buffers, optimizer, grad clipping, checkpoint exchange).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "zeros_like", "ones_like", "empty_like", "full_like", "arange")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    d = _REAL_TORCH.device(device)
    return "cpu" if d.type == "cuda" else device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _TorchWithCpuFactories(types.ModuleType):
    """``torch`` as seen by one megatron module: identical except that its tensor factories
    put device="cuda" tensors on the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(_REAL_TORCH, name)))

    def __getattr__(self, name):
        return getattr(_REAL_TORCH, name)


_REAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, *args, **kwargs):
    out = _REAL_TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs or not isinstance(out, str) or out.startswith("torch.cuda."):
        return out
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.startswith("megatron.core.") and out.startswith("torch."):
        return "torch.cuda." + out[len("torch.") :]
    return out


def _cpu_get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def apply() -> bool:
    """Install the shims when no GPU is present; returns whether they are active."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _seed
    torch.cuda.manual_seed_all = _seed
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state

    proxy = _TorchWithCpuFactories()
    for name in _CUDA_LITERAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module a future megatron-core moved; nothing to patch there
            continue
        if getattr(module, "torch", None) is _REAL_TORCH:
            module.torch = proxy
    _applied = True
    return True
