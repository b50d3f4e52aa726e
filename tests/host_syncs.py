"""Counting device-to-host syncs on CPU: the aten operations that, on a GPU, make the host wait
for the device (an output size or a value the host must read). A TorchDispatchMode sees every
operation a forward or backward dispatches, so a test can count them without a GPU.

Counted: ``nonzero`` (and what decomposes to it), ``_local_scalar_dense`` (``.item()``,
``bool(t)``, ``int(t)``), ``is_nonzero``, ``masked_select``, ``equal``, the unique family,
``repeat_interleave`` without ``output_size``, and indexing or index assignment with a
boolean (or uint8) index tensor (its kernel runs ``nonzero`` inside, below the mode). Not
seen: explicit device-to-host copies (every tensor is on the CPU here).

Each counted call is attributed to the innermost frame of the package (``megatron_gem/...``)
on the Python stack, so a test can ask how many syncs one file's code made.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset(
    {
        "aten::nonzero",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::masked_select",
        "aten::equal",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }
)
BOOL_INDEX_OPS = frozenset({"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"})


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _syncs(func, args, kwargs) -> bool:
    name = func._schema.name
    if name in SYNC_OPS:
        return True
    if name in BOOL_INDEX_OPS:
        return _has_bool_index(args)
    if name == "aten::repeat_interleave":  # tensor repeats: the output size is their sum
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False


def _origin() -> str:
    """The innermost ``megatron_gem/...`` file on the stack ("" when none)."""
    for frame in reversed(traceback.extract_stack()):
        i = frame.filename.rfind("megatron_gem/")
        if i >= 0:
            return frame.filename[i:]
    return ""


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...`` -> ``c.ops`` (Counter of aten names), ``c.origins``
    (Counter of package files), ``c.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.origins: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.ops[func._schema.name] += 1
            self.origins[_origin()] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def from_files(self, *suffixes: str) -> int:
        """Syncs made by code in package files whose path ends with one of ``suffixes``."""
        return sum(n for origin, n in self.origins.items() if origin and origin.endswith(suffixes))
