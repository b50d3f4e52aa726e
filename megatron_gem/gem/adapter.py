"""Summary mode, the generation-exact GEM (docs/method.md, "Summary mode"): the base model is
frozen and low-rank deltas act only at summary positions, so every plain-text forward (and the
text part of every GEM layout, with the default positions) is the base model's, bit for bit.

Pieces (plain torch; the HF and megatron-core adapters attach them to their linear layers):
  adapter_active   which tokens the deltas act on: SPECIAL (default) or SPECIAL + SUFFIX,
                   never PREFIX text, never padding.
  ActiveMask       the positions of the forward now running; set at each decoder layer's entry
                   from that layer's own arguments (so activation recomputation, which re-runs
                   the layer with the same arguments, sees the same positions).
  LowRankDelta     x -> (x A^T) B^T * alpha / r on the active rows only, B zero at start (so a
                   fresh adapter is the base model exactly), A Kaiming-uniform like PEFT's LoRA.
  SummaryAdapter   the deltas of one model by layer name (its state dict is the adapter file).
"""

from __future__ import annotations

import contextlib
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


class ActiveMask:
    """Where the deltas act in the forward now running: None (nowhere: the base model), or a
    bool mask over the token dimensions of the layer inputs (layout: the adapter's)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def clear(self) -> None:
        self.mask = None


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

    def forward(self, x: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``output`` (the base layer's output for ``x``) plus the delta on the rows where
        ``mask`` [x.shape[:-1]] is True; ``output`` itself (the same tensor) when no row is."""
        if mask is None:
            return output
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"adapter mask {tuple(mask.shape)} does not match the layer input {tuple(x.shape[:-1])}")
        rows = x[mask]
        if rows.shape[0] == 0:
            return output
        out = output.clone()
        out[mask] = out[mask] + self.delta(rows).to(out.dtype)
        return out


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

    def set_positions(self, roles: torch.Tensor | None, doc_ids: torch.Tensor | None) -> None:
        """Activate at this batch's summary positions; None (no GEM metadata): nowhere."""
        self.active.set(None if roles is None else adapter_active(roles, doc_ids, self.positions))


@contextlib.contextmanager
def base_only(adapter):
    """The deltas act nowhere inside the block (the base model exactly), GEM metadata or not:
    the no-grad prefill of the phase-2 fast path, in both engines. ``adapter``: a SummaryAdapter
    or mcore's MegatronSummaryAdapter (both read ``suspended`` when setting their rows)."""
    before = adapter.suspended
    adapter.suspended = True
    try:
        yield
    finally:
        adapter.suspended = before
        adapter.active.clear()
