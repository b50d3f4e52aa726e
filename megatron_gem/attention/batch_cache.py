"""What is derived from one batch's GEM metadata, built once and shared by every layer.

A forward calls attention once per layer with the same (doc_ids, roles); activation recompute
calls it again in the backward. What a backend derives from them (the dense mask, the Triton
block table, FlexAttention's BlockMask, whether the layout is plain causal) costs O(L) to
O(L^2) work and, for the tables, host syncs: it must be built once per batch, not per call.

The key is not the tensor objects the layer receives: megatron-core hands each layer new views
(attention/megatron.py ``split_mask_info`` returns ``info[0]``, ``info[1]``), and its activation
recompute re-runs each layer on ``detach()``-ed copies of its inputs. A key is, per metadata
tensor, the memory it reads and the version of that memory:
  * device, address of the first element (``data_ptr``), shape, strides and dtype: views and
    detached copies of one batch tensor share them;
  * the version counter (shared by a tensor, its views and its detached copies), bumped by
    every in-place write, so an edited batch is rebuilt;
plus what the derivation depends on (``extra``: window, tiling, device, ...). An entry holds a
reference to the tensors it was built from: their memory cannot be freed and handed to another
batch while the entry lives, so an equal key means the same memory, unedited. Reading the key
costs no device work and no host sync. (Writes that bypass the version counter, through
``.data`` or a numpy alias, are not seen; nothing in this project writes batch metadata so.)

Inference tensors (``torch.inference_mode``) carry no version counter: for them an entry holds
until evicted. Every caller of this project builds new metadata tensors per batch; code that
rewrites one inference tensor in place between two forwards must clear the cache
(``clear_batch_caches``).

Several micro-batches can be in flight at once (a pipeline stage runs forwards of later
micro-batches before the backward, and the recompute, of earlier ones), so a cache holds up to
``capacity`` batches, least recently used out first. Under FakeTensorMode and inside
torch.compile tracing nothing is cached (no data to key on; the traced graph holds the
derivation itself).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (FakeTensorMode, torch.compile tracing): shapes only, no data. (Imported on
    first use: the module costs import time nobody needs before a forward.)"""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def _version(t: torch.Tensor):
    if t.is_inference():
        return None  # no version counter (see the module docstring)
    return t._version


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, _version(t))


class PerBatchCache:
    """``get(tensors, extra, build)`` returns ``build()``'s value, built once per batch.

    ``builds`` counts the calls of ``build`` (tests read it)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.builds = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (the tensors it was built from, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tensors: tuple, extra: tuple, build):
        if torch.compiler.is_compiling() or any(is_fake(t) for t in tensors):
            self.builds += 1
            return build()
        key = (tuple(_key(t) for t in tensors), extra)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[1]
        value = build()
        self.builds += 1
        self._entries[key] = (tuple(tensors), value)  # the reference keeps the memory from reuse
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value


# Shared by both engines' adapters through attention/dispatch.py. The dense masks are O(L^2)
# bytes each, so fewer of them are kept; the others are O(L) or O((L / block)^2) small.
dense_masks = PerBatchCache(capacity=2)
causal_layouts = PerBatchCache()
block_tables = PerBatchCache()
flex_block_masks = PerBatchCache()


def clear_batch_caches() -> None:
    """Forget every derived value (e.g. after an in-place edit of inference-mode metadata)."""
    for cache in (dense_masks, causal_layouts, block_tables, flex_block_masks):
        cache.clear()
