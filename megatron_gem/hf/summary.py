"""Summary mode on an HF causal LM: attach gem/adapter.py's deltas to its linear layers.

The base model's modules, parameters and state dict are left as they are (no wrapping): each
adapted ``nn.Linear`` gets a forward hook that adds its delta on the active rows, and each
decoder layer a forward pre-hook that sets the active rows from the ``roles``/``doc_ids`` the
layer receives (transformers passes the extra model keywords down to every layer). Setting
them per layer, from the layer's own arguments, keeps activation recomputation exact: a
recomputed layer is called with the same arguments and sees the same rows. A forward without
``roles`` (plain text, ``generate()``) runs the base model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gem.adapter import SummaryAdapter
from ..gem.config import GEMConfig

# Every attention and MLP projection of the Llama/Mistral family (HF module names).
DEFAULT_HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layers(lm) -> nn.ModuleList:
    layers = getattr(getattr(lm, "base_model", lm), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(lm).__name__}: no decoder layer list at base_model.layers; summary mode supports Llama-style HF models")
    return layers


def adapter_shapes(lm, targets) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the linear layers named in ``targets``
    (last name component), inside the decoder layers (never the LM head or embeddings)."""
    prefix = None
    for name, module in lm.named_modules():
        if module is decoder_layers(lm):
            prefix = name + "."
            break
    shapes = {}
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def attach_summary_adapter(lm, config: GEMConfig, *, adapter: SummaryAdapter | None = None) -> SummaryAdapter:
    """Freeze every parameter of ``lm`` and hook ``adapter`` (a new one from ``config`` when
    None: rank, alpha, targets, positions) onto its linear layers. Returns the adapter, which
    the caller owns (optimizer, checkpoint, export); ``detach_summary_adapter`` undoes the hooks."""
    targets = tuple(config.adapter_targets) or DEFAULT_HF_TARGETS
    shapes = adapter_shapes(lm, targets)
    if adapter is None:
        weight = lm.get_input_embeddings().weight
        adapter = SummaryAdapter(shapes, rank=config.adapter_rank, alpha=config.adapter_alpha, positions=config.adapter_positions, dtype=weight.dtype)
        adapter.to(weight.device)
    elif sorted(adapter.names) != sorted(shapes):
        raise ValueError(f"the adapter's layers {sorted(adapter.names)[:3]}... do not match the model's {sorted(shapes)[:3]}...")
    for p in lm.parameters():
        p.requires_grad_(False)
    modules = dict(lm.named_modules())
    handles = []
    for name in shapes:
        delta = adapter.delta_for(name)
        handles.append(modules[name].register_forward_hook(lambda mod, args, out, d=delta: d(args[0], out, adapter.active.mask)))

    def set_rows(mod, args, kwargs):
        adapter.set_positions(kwargs.get("roles"), kwargs.get("doc_ids"))

    for layer in decoder_layers(lm):
        handles.append(layer.register_forward_pre_hook(set_rows, with_kwargs=True))
    adapter.hook_handles = handles
    return adapter


def detach_summary_adapter(adapter: SummaryAdapter) -> None:
    for h in getattr(adapter, "hook_handles", []):
        h.remove()
    adapter.hook_handles = []
    adapter.active.clear()


@torch.no_grad()
def logits_of(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain-text logits (no GEM metadata): what generation computes."""
    return lm(input_ids=input_ids, use_cache=False).logits
