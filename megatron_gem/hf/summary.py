"""Summary mode on an HF causal LM: attach gem/adapter.py's deltas to its linear layers.

The base model's modules, parameters and state dict are left as they are (no wrapping): each
adapted ``nn.Linear`` gets a forward hook that adds its delta on the active rows, and each
decoder layer a forward pre-hook that sets the active rows from the ``roles``/``doc_ids`` the
layer receives, none when the call says ``gem_base_only`` (the fast path's prefill: a per-call
keyword, no flag on the adapter) (transformers passes the extra model keywords down to every layer; the layers of
one forward share one gem.adapter.ActiveRows, found with one sync). The delta is added into the
linear's fresh output in place (no copy of it, no boolean mask). Activation
recomputation re-runs a layer's forward without its hooks, so the layer's checkpoint function is
wrapped to re-set the rows of that call (``_pin_rows_for_recompute``). A forward without
``roles`` (plain text, ``generate()``) runs the base model exactly.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..gem.adapter import ActiveRows, SummaryAdapter
from ..gem.config import GEMConfig
from ..gem.summary_step import gather_summary_queries, prefill_keys

# The per-call keyword of a forward whose deltas act nowhere, GEM metadata or not (the base model
# exactly): the phase-2 fast path's prefill. transformers passes it down to every decoder layer
# with doc_ids/roles; the attention ignores it.
BASE_ONLY = "gem_base_only"

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
        # in_place: ``out`` is the linear's fresh output, which nothing else has read yet.
        handles.append(modules[name].register_forward_hook(lambda mod, args, out, d=delta: d(args[0], out, adapter.active.rows, in_place=True)))

    def set_rows(mod, args, kwargs):
        if kwargs.get(BASE_ONLY):
            adapter.active.clear()
        else:
            adapter.set_positions(kwargs.get("roles"), kwargs.get("doc_ids"))
        _pin_rows_for_recompute(mod, adapter)

    for layer in decoder_layers(lm):
        handles.append(layer.register_forward_pre_hook(set_rows, with_kwargs=True))
    handles.append(getattr(lm, "base_model", lm).register_forward_pre_hook(lambda mod, args: adapter.active.begin_forward()))
    adapter.hook_handles = handles
    return adapter


def _pin_rows_for_recompute(layer, adapter: SummaryAdapter) -> None:
    """transformers checkpoints a decoder layer's ``forward``, not its ``__call__``: the
    recomputation in backward does not run the pre-hook, and would see whatever rows the LAST
    forward set (e.g. the contrastive forward of the same step, run before one backward). So the
    layer's checkpoint function is wrapped (once, lazily: enabling recomputation later replaces
    it) to re-set the rows this call saw inside the recomputed function."""
    ckpt = getattr(layer, "_gradient_checkpointing_func", None)
    if ckpt is None or getattr(ckpt, "gem_pins_rows", False):
        return

    def checkpoint_with_rows(fn, *args, **kwargs):
        rows = adapter.active.rows

        def run(*a, **kw):
            adapter.active.set(rows)
            return fn(*a, **kw)

        return ckpt(run, *args, **kwargs)

    checkpoint_with_rows.gem_pins_rows = True
    layer._gradient_checkpointing_func = checkpoint_with_rows


def detach_summary_adapter(adapter: SummaryAdapter) -> None:
    for h in getattr(adapter, "hook_handles", []):
        h.remove()
    adapter.hook_handles = []
    adapter.active.forget()


@torch.no_grad()
def logits_of(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain-text logits (no GEM metadata): what generation computes."""
    return lm(input_ids=input_ids, use_cache=False).logits


@contextlib.contextmanager
def no_recompute(lm):
    """Activation recomputation off inside the block. transformers drops the KV cache of a
    layer it checkpoints; the summary step that reads the cache is tiny (K tokens per text), so
    it keeps its activations instead."""
    layers = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def cache_kwargs(lm, cache) -> dict:
    """The keyword arguments that hand ``cache`` to ``lm.base_model``."""
    # transformers 5.2x names the argument ``cache`` (``past_key_values`` is deprecated there);
    # older 5.x releases only know ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(lm.base_model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def summary_states(lm, adapter: SummaryAdapter, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summary mode's phase-2 fast path: last-layer states [B, S, H] of the summary tokens of a
    packed batch (their metadata: the returned dict, see gem/summary_step.py
    gather_summary_queries), equal to the full-row forward's states at those tokens. (1) the rows
    run once without autograd, deltas off, keeping the KV cache; (2) only the summary tokens run
    with autograd, reading that cache (why it is exact: gem/summary_step.py). Step (2) costs K
    tokens per text."""
    from transformers import DynamicCache

    ids, pos, docs, roles = batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["roles"]
    q = gather_summary_queries(batch)
    # Full-length layers, not the config's: a sliding-window model's (Mistral) cache layers keep
    # only the last window of keys, but the summary step's key metadata describes the whole row
    # (the GEM rule applies the window itself, gem/mask.py rule 5).
    cache = DynamicCache()
    with torch.no_grad():
        lm.base_model(input_ids=ids, position_ids=pos, doc_ids=docs, roles=roles, **{BASE_ONLY: True}, **cache_kwargs(lm, cache))
    k = prefill_keys(docs, roles, q)
    keys = {
        "gem_key_doc_ids": k["doc_ids"],
        "gem_key_roles": k["roles"],
        "gem_key_index": k["index"],
        "gem_key_is_doc_start": k["is_doc_start"],
        "gem_query_index": q["index"],
    }
    with no_recompute(lm):
        out = lm.base_model(input_ids=q["input_ids"], position_ids=q["position_ids"], doc_ids=q["doc_ids"], roles=q["roles"], **keys, **cache_kwargs(lm, cache))
    return out.last_hidden_state, q


def touch_adapter(adapter: SummaryAdapter, like: torch.Tensor) -> torch.Tensor:
    """0 (a scalar of ``like``'s dtype) that depends on every delta, through each delta module's
    own forward (so ZeRO-3 gathers its partitions): added to a forward whose batch activates the
    deltas nowhere, so every trainable parameter still takes part (see GEMModel.forward)."""
    total = like.new_zeros(())
    row = ActiveRows((1,), torch.zeros(1, dtype=torch.long, device=like.device))  # built here: no sync
    for d in adapter.deltas.values():
        in_features = getattr(d.lora_A, "ds_shape", d.lora_A.shape)[1]  # ZeRO-3 partitions are flat; ds_shape is the real shape
        out_features = getattr(d.lora_B, "ds_shape", d.lora_B.shape)[0]
        out = d(like.new_zeros(1, in_features), like.new_zeros(1, out_features), row)
        total = total + 0.0 * out.sum()
    return total


def adapter_acts_on(adapter: SummaryAdapter, batch: dict) -> bool:
    """Whether a forward of ``batch`` activates the deltas anywhere. After a forward of the same
    ``batch`` tensors this asks the device nothing (the rows its layers found are memoised)."""
    return adapter.rows_for(batch["roles"], batch["doc_ids"]).count > 0
