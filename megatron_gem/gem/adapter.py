"""Summary mode, the generation-exact GEM (docs/method.md, "Summary mode"): the base model is
frozen and low-rank deltas act only at summary positions, so every plain-text forward (and the
text part of every GEM layout, with the default positions) is the base model's, bit for bit.

Pieces (plain torch; the HF and megatron-core adapters attach them to their linear layers):
  adapter_active   which tokens the deltas act on: SPECIAL (default) or SPECIAL + SUFFIX,
                   never PREFIX text, never padding.
  ActiveRows       those tokens of one batch as flat indices, found once per batch (one
                   ``nonzero``: the only device-to-host sync summary mode adds to a forward).
  ActiveMask       the rows of the forward now running; set at each decoder layer's entry
                   from that layer's own arguments (so activation recomputation, which re-runs
                   the layer with the same arguments, sees the same rows), through a small memo
                   so the layers of one forward share one ActiveRows.
  LowRankDelta     x -> (x A^T) B^T * alpha / r on the active rows only, B zero at start (so a
                   fresh adapter is the base model exactly), A Kaiming-uniform like PEFT's LoRA.
                   The rows are gathered and added back by index (no boolean masks, no sync),
                   in place into the base layer's fresh output where autograd allows.
  SummaryAdapter   the deltas of one model by layer name (its state dict is the adapter file).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .config import ADAPTER_POSITIONS
from .roles import PAD_DOC_ID, Role


def adapter_active(roles: torch.Tensor, doc_ids: torch.Tensor, positions: str = "special") -> torch.Tensor:
    """Bool [.., L]: True where the deltas act."""
    if positions == "special":
        on = roles == Role.SPECIAL
    elif positions == "special+suffix":
        on = roles != Role.PREFIX
    else:
        raise ValueError(f"adapter positions {positions!r}: expected one of {ADAPTER_POSITIONS}")
    return on & (doc_ids != PAD_DOC_ID)


class ActiveRows:
    """The tokens the deltas act on in one batch: ``index`` [n] int64, their flat positions
    (row-major) in a tensor of token shape ``shape`` (the token dimensions of the layer inputs),
    and ``count`` = n, known on the host (``nonzero`` sized its output), so a layer decides
    "no row" without asking the device."""

    __slots__ = ("shape", "index", "count")

    def __init__(self, shape: torch.Size, index: torch.Tensor) -> None:
        self.shape, self.index, self.count = torch.Size(shape), index, int(index.shape[0])

    @classmethod
    def of(cls, mask: torch.Tensor) -> ActiveRows:
        """The True entries of a bool mask: one ``nonzero``, the one device-to-host sync.
        (A sync-free index would need a host-known bound on the number of summary tokens; a
        batch does not carry one, and the full-length bound computes every row.)"""
        return cls(mask.shape, mask.reshape(-1).nonzero().squeeze(1))


def alias_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents without reading them: its memory (address, shape,
    strides, dtype) and its version counter. Views and ``detach()`` copies of one tensor (what
    activation recompute hands a layer) share all of it; an in-place write bumps the version.
    Inference tensors have no version counter (last field None): such a key is trusted only
    within one forward (ActiveMask.begin_forward)."""
    version = None if t.is_inference() else t._version
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), version)


class ActiveMask:
    """Where the deltas act in the forward now running: ``rows`` None (nowhere: the base model),
    or an ActiveRows over the token dimensions of the layer inputs (layout: the adapter's).

    ``rows_for`` memoises the rows of the last few batches by the metadata tensors they come
    from (see _alias_key), so every decoder layer of a forward, and the recomputation of any
    of them, reuses one ActiveRows instead of syncing again. Each entry holds its metadata
    tensors, so their memory cannot be reused by another batch while the key is remembered.
    The adapters call ``begin_forward`` at each model forward: it forgets the entries whose
    tensors cannot show an in-place write (inference tensors)."""

    MEMO_SIZE = 8  # batches in flight at once: a pipeline's micro-batches, forward + recompute

    def __init__(self) -> None:
        self.rows: ActiveRows | None = None
        self._memo: list[tuple[tuple, tuple[torch.Tensor, ...], ActiveRows]] = []

    def set(self, rows: ActiveRows | None) -> None:
        self.rows = rows

    def clear(self) -> None:
        self.rows = None

    def begin_forward(self) -> None:
        self._memo = [e for e in self._memo if all(k[-1] is not None for k in e[0])]

    def forget(self) -> None:
        """Drop the memo too (the adapter is detached)."""
        self.rows, self._memo = None, []

    def rows_for(self, sources: tuple[torch.Tensor, ...], mask_of) -> ActiveRows:
        """The ActiveRows of ``mask_of()``, a bool mask computed from the tensors ``sources``
        alone: from the memo when the same ``sources`` were seen, else built (one sync)."""
        key = tuple(alias_key(t) for t in sources)
        for i, (k, _, rows) in enumerate(self._memo):
            if k == key:
                self._memo.insert(0, self._memo.pop(i))
                return rows
        rows = ActiveRows.of(mask_of())
        self._memo = [(key, sources, rows)] + self._memo[: self.MEMO_SIZE - 1]
        return rows


def _writable_in_place(output: torch.Tensor) -> bool:
    """Whether autograd lets the delta be added into ``output`` itself: not a view (a custom
    autograd Function's pass-through output is one, e.g. megatron-core's tensor-parallel
    all-reduce after RowParallelLinear; a biased nn.Linear on 3-D input returns one too), not a
    leaf that requires grad, contiguous (so a flat [tokens, out] view of it exists). The base
    linear layers do not save their output for backward, so writing into it is safe for them."""
    return not output._is_view() and output.is_contiguous() and not (output.is_leaf and output.requires_grad)


class LowRankDelta(nn.Module):
    """The delta of one linear layer: ``lora_A`` [r, in] and ``lora_B`` [out, r] (PEFT's names
    and shapes, so the adapter file maps onto PEFT's LoRA keys one to one)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, dtype=None, device=None):
        super().__init__()
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank product on rows ``x`` [n, in] -> [n, out]."""
        return (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def forward(self, x: torch.Tensor, output: torch.Tensor, rows: ActiveRows | torch.Tensor | None, *, in_place: bool = False) -> torch.Tensor:
        """``output`` (the base layer's output for ``x``) plus the delta on the active rows;
        ``output`` itself (the same tensor, untouched) when no row is active. ``rows``: an
        ActiveRows over ``x.shape[:-1]`` (what the hooks pass: no device-to-host sync here), a
        bool mask of that shape (found with one sync), or None. ``in_place``: add into
        ``output`` itself when autograd allows (the hooks: the base layer's fresh output, which
        nothing else has read); otherwise, and by default, a new tensor."""
        if rows is None:
            return output
        if rows.shape != x.shape[:-1]:
            raise ValueError(f"adapter mask {tuple(rows.shape)} does not match the layer input {tuple(x.shape[:-1])}")
        if isinstance(rows, torch.Tensor):
            rows = ActiveRows.of(rows)
        if rows.count == 0:
            return output
        values = self.delta(x.flatten(0, -2).index_select(0, rows.index)).to(output.dtype)
        if in_place and _writable_in_place(output):
            output.view(-1, output.shape[-1]).index_add_(0, rows.index, values)
            return output
        return output.flatten(0, -2).index_add(0, rows.index, values).view(output.shape)


def adapter_key(module_name: str) -> str:
    """A ModuleDict key for a dotted module name ("model.layers.0.self_attn.q_proj")."""
    return re.sub(r"[^0-9A-Za-z_]", "__", module_name)


class SummaryAdapter(nn.Module):
    """The deltas of one model: ``deltas[adapter_key(name)]`` for each adapted linear layer
    ``name`` (shapes: {name: (in_features, out_features)}), sharing one ActiveMask."""

    def __init__(self, shapes: dict[str, tuple[int, int]], *, rank: int, alpha: float, positions: str = "special", dtype=None, device=None):
        super().__init__()
        if not shapes:
            raise ValueError("summary mode found no layer to adapt: check GEMConfig.adapter_targets (--gem-adapter-targets)")
        self.names = list(shapes)
        self.positions = positions
        self.active = ActiveMask()
        self.deltas = nn.ModuleDict({adapter_key(n): LowRankDelta(i, o, rank, alpha, dtype=dtype, device=device) for n, (i, o) in shapes.items()})

    def delta_for(self, name: str) -> LowRankDelta:
        return self.deltas[adapter_key(name)]

    def rows_for(self, roles: torch.Tensor, doc_ids: torch.Tensor) -> ActiveRows:
        """Where the deltas act in a batch of this metadata (memoised: one sync per batch)."""
        return self.active.rows_for((roles, doc_ids), lambda: adapter_active(roles, doc_ids, self.positions))

    def set_positions(self, roles: torch.Tensor | None, doc_ids: torch.Tensor | None) -> None:
        """Activate at this batch's summary positions; None (no GEM metadata): nowhere."""
        self.active.set(None if roles is None else self.rows_for(roles, doc_ids))
