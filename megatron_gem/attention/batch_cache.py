"""What is derived from one batch's GEM metadata, built once and shared by every layer.

A forward calls attention once per layer with the same (doc_ids, roles); activation recompute
calls it again in the backward. What a backend derives from them (the dense mask, the Triton
block table, FlexAttention's BlockMask, whether the layout is plain causal) costs O(L) to
O(L^2) work and, for the tables, host syncs: it must be built once per batch, not per call.

The key is not the tensor objects the layer receives: megatron-core hands each layer new views
(attention/megatron.py ``split_mask_info`` returns ``info[0]``, ``info[1]``), in the forward and
again in a recompute. A key is, per metadata tensor,
  * the tensor it views (``t._base``, else ``t`` itself), held by a weak reference: an entry
    matches only while that very object is alive, so memory freed by one batch and reused by
    the next can never alias (a dead base drops its entries at once);
  * the view's geometry: storage offset, shape, strides, dtype;
  * the base's version counter (shared by all its views), bumped by every in-place write, so
    an edited batch is rebuilt;
plus what the derivation depends on (``extra``: window, tiling, device, ...). Reading these
costs no device work and no host sync.

Inference tensors (``torch.inference_mode``) carry no version counter: for them an entry holds
while the base object lives and is not edited in place. Every caller of this project builds
new metadata tensors per batch; code that rewrites one inference tensor in place between two
forwards must clear the cache (``clear_batch_caches``).

Several micro-batches can be in flight at once (a pipeline stage runs forwards of later
micro-batches before the backward, and the recompute, of earlier ones), so a cache holds up to
``capacity`` batches, least recently used out first. Under FakeTensorMode and inside
torch.compile tracing nothing is cached (no data to key on; the traced graph holds the
derivation itself).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (FakeTensorMode, torch.compile tracing): shapes only, no data. (Imported on
    first use: the module costs import time nobody needs before a forward.)"""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def _base(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _version(t: torch.Tensor):
    if t.is_inference():
        return None  # no version counter (see the module docstring)
    return t._version


class PerBatchCache:
    """``get(tensors, extra, build)`` returns ``build()``'s value, built once per batch.

    ``builds`` counts the calls of ``build`` (tests read it)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.builds = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (weak refs to the bases, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tensors: tuple, extra: tuple, build):
        if torch.compiler.is_compiling() or any(is_fake(t) for t in tensors):
            self.builds += 1
            return build()
        bases = [_base(t) for t in tensors]
        key = (
            tuple((id(b), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, _version(b)) for t, b in zip(tensors, bases)),
            extra,
        )
        hit = self._entries.get(key)
        if hit is not None and all(ref() is b for ref, b in zip(hit[0], bases)):
            self._entries.move_to_end(key)
            return hit[1]
        value = build()
        self.builds += 1
        drop = self._drop_callback(key)
        self._entries[key] = ([weakref.ref(b, drop) for b in bases], value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def _drop_callback(self, key):
        entries = weakref.ref(self._entries)

        def drop(_ref):  # a base died: its derived values go with it
            live = entries()
            if live is not None:
                live.pop(key, None)

        return drop


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
