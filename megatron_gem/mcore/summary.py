"""Summary mode on a megatron-core GEM model (docs/megatron.md, "Summary mode"): the base model
frozen, gem/adapter.py's low-rank deltas on the decoder's linear layers, split over tensor
parallelism like the layer each adapts:

  ColumnParallelLinear (linear_qkv, linear_fc1; output split over TP):
      lora_A [r, in] replicated, lora_B [out/TP, r] sharded like the weight's rows.
      u = x A^T is the same on every rank; copy_to_tensor_model_parallel_region(u) all-reduces
      its gradient (each rank's dL/du only sees its output slice), so dA is whole everywhere.
  RowParallelLinear (linear_proj, linear_fc2; input split over TP):
      lora_A [r, in/TP] sharded like the weight's columns, lora_B [out, r] replicated.
      u = reduce_from_tensor_model_parallel_region(x_local A_local^T) sums the partial products.

One delta acts on the fused linear_qkv output (q/k/v interleaved per query group) and one on
the fused linear_fc1 ([gate; up]); ``hf_adapter_tensors`` maps them onto HF's q/k/v_proj and
gate/up_proj deltas (lora_A shared, lora_B rows split like the weights), which is exact: a
fused delta is x A^T B^T, and B's row blocks are the per-projection deltas.

Hooks, not wrapped layers (the base modules and their state dict stay megatron-core's own):
each adapted linear gets a forward hook adding its delta on the active rows; each
TransformerLayer a forward pre-hook setting the active rows from the layer's own
``attention_mask`` argument (gem_mask_info: doc_ids/roles [B, L], transposed to megatron's
sequence-first [L, B]), so a recomputed layer (--recompute-granularity full) sees the same rows.
The rows are found once per micro-batch (gem.adapter.ActiveMask.rows_for: the layers, and their
recomputation on the detached copy of the same argument, share one ActiveRows) and the deltas
add by index, with no device-to-host sync per layer. Column-parallel outputs take the delta in
place; a RowParallelLinear's output comes out of the tensor-parallel all-reduce Function as a
view autograd forbids writing into, so it takes it out of place (one copy of that output).
Summary mode's phase-2 fast path (gem/summary_step.py) runs as two schedule passes whose
micro-batches say per call what they are: ``SummaryFastPath`` (the one handle the engine
holds for a step) builds the prefill batches (deltas off; every layer's keys and values
recorded under the micro-batch's slot) and the summary-step batches (the gathered summary
tokens, reading that record), and registers their ``attention_mask`` tensors in its
``PrefillKV``; a pre-hook on each core attention looks the call's own ``attention_mask`` up
there (by its memory, gem.adapter.alias_key: no host sync, and a recomputed layer's detached
copy finds the same entry), records, or hands the core attention a ``CachedPrefix``
(attention/cached.py) instead. The core attention holds no store and reads no schedule.

The deltas' initial values depend only on the seed and the global layer (a full A is drawn,
then sliced), so every TP x PP layout starts from the single-process adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..gem.adapter import ActiveMask, LowRankDelta, adapter_active, adapter_key, alias_key
from ..gem.config import GEMConfig
from ..gem.summary_step import gather_summary_queries, prefill_keys, summary_width
from .hf_mapping import layer_offsets, shard, split_qkv, unshard

# megatron layer (inside decoder.layers.{i}) -> (parallel kind, the HF projections it fuses)
TARGETS = {
    "self_attention.linear_qkv": ("column", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("row", ("o_proj",)),
    "mlp.linear_fc1": ("column", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("row", ("down_proj",)),
}
_HF_PREFIX = {"self_attention": "self_attn", "mlp": "mlp"}
ADAPTER_ATTR = "gem_adapter"  # the adapter's attribute (and state-dict prefix) on the GEMGPTModel


def megatron_targets(targets) -> list[str]:
    """The megatron layers (TARGETS keys) that ``--gem-adapter-targets`` names, by megatron
    (linear_qkv) or HF (q_proj) names; empty: all. Fused projections go together."""
    if not targets:
        return list(TARGETS)
    wanted, out = set(targets), []
    known = set()
    for layer, (_, hf) in TARGETS.items():
        short = layer.rsplit(".", 1)[-1]
        known |= {short, *hf}
        named = wanted & {short, *hf}
        if not named:
            continue
        if short not in named and set(hf) - named:
            raise ValueError(f"--gem-adapter-targets {sorted(named)}: megatron-core fuses {'/'.join(hf)} into {short}; name all of them (or {short}) or none")
        out.append(layer)
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--gem-adapter-targets {unknown}: unknown; megatron-core layers are {sorted(known)}")
    return out


class ParallelLowRankDelta(LowRankDelta):
    """A LowRankDelta whose A or B is this TP rank's slice (see the module docstring)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, *, alpha: float, parallel: str):
        nn.Module.__init__(self)
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.rank = lora_A.shape[0]
        self.scaling = alpha / self.rank
        self.parallel = parallel
        self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
        # The sharded one is TP-local (megatron counts it on every rank in the grad norm); the
        # replicated one is counted once.
        if parallel == "column":
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)
        else:
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region

        u = x.to(self.lora_A.dtype) @ self.lora_A.t()
        u = copy_to_tensor_model_parallel_region(u) if self.parallel == "column" else reduce_from_tensor_model_parallel_region(u)
        return u @ self.lora_B.t() * self.scaling


def initial_lora_A(rank: int, in_features: int, *, seed: int, layer: int, target: int) -> torch.Tensor:
    """The full A of one delta: PEFT's Kaiming-uniform init from a generator of (seed, global
    layer, target), so it does not depend on TP/PP or consume the global RNG."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + target)
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return a


PREFILL, SUMMARY_STEP = "prefill", "summary step"


class PrefillKV:
    """The fast path's record of one optimizer step: which ``attention_mask`` tensors are a
    prefill or a summary step of which micro-batch slot (``bind``), and the keys and values each
    layer's prefill recorded (``record``/``read``, per (slot, layer)). Entries hold their mask
    tensors, so no other batch can reuse that memory while they live; ``clear()`` (the end of
    the step: SummaryFastPath) drops everything."""

    def __init__(self) -> None:
        self.calls: dict[tuple, tuple[torch.Tensor, str, int]] = {}
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def bind(self, info: torch.Tensor, kind: str, slot: int) -> torch.Tensor:
        self.calls[(alias_key(info),)] = (info, kind, slot)
        return info

    def call_of(self, info) -> tuple[str | None, int | None]:
        """(PREFILL or SUMMARY_STEP, slot) of a bound mask; (None, None) for any other argument."""
        if not self.calls or not isinstance(info, torch.Tensor):
            return None, None
        hit = self.calls.get((alias_key(info),))
        return (hit[1], hit[2]) if hit is not None else (None, None)

    def record(self, slot: int, layer: int, key: torch.Tensor, value: torch.Tensor, info: torch.Tensor) -> None:
        self.entries[(slot, layer)] = (key.detach(), value.detach(), info)

    def read(self, slot: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (slot, layer) not in self.entries:
            raise RuntimeError(f"summary step: no recorded prefill for micro-batch {slot}, layer {layer}")
        return self.entries[(slot, layer)]

    def clear(self) -> None:
        self.calls.clear()
        self.entries.clear()


def _prefill_pre_hook(store: PrefillKV):
    """Forward pre-hook of a GEM core attention (query, key, value, attention_mask, ...): a
    prefill call records its keys and values [B, H, L, D] and runs as usual; a summary-step call
    gets a CachedPrefix (its slot's record + both sides' metadata) as its attention_mask."""
    from ..attention.cached import CachedPrefix

    def hook(module, args, kwargs):
        positional = len(args) > 3
        info = args[3] if positional else kwargs.get("attention_mask")
        kind, slot = store.call_of(info)
        if kind is None:
            return None
        layer = module.layer_number
        if kind == PREFILL:
            store.record(slot, layer, args[1].permute(1, 2, 0, 3), args[2].permute(1, 2, 0, 3), info)
            return None
        k_pre, v_pre, pre_info = store.read(slot, layer)
        queries = {"doc_ids": info[0], "roles": info[1], "index": info[2]}
        keys = prefill_keys(pre_info[0], pre_info[1], queries)
        prefix = CachedPrefix(k_pre, v_pre, info[0], info[1], info[2], keys["doc_ids"], keys["roles"], keys["index"], keys["is_doc_start"])
        if positional:
            return (*args[:3], prefix, *args[4:]), kwargs
        return args, {**kwargs, "attention_mask": prefix}

    return hook


class SummaryFastPath:
    """The engine's one handle on summary mode's phase-2 fast path for an optimizer step::

        with SummaryFastPath(model) as fast:
            prefills = fast.prefill_batches(micro)   # run forward-only, without autograd
            steps, width = fast.step_batches(micro)  # then forward/backward these

    ``micro``: joined contrastive micro-batches (mcore.forward_rows.join_rows). The prefill batches run
    the base model (deltas off) and record every layer's keys and values under their slot; the
    summary-step batches ([B, width] gathered summary tokens, gem/summary_step.py) read them.
    Leaving the block drops the record."""

    def __init__(self, model):
        adapter = summary_adapter_of(model)
        if adapter is None:
            raise RuntimeError("the summary fast path needs a model in summary mode (no gem_adapter attached)")
        self.store = adapter.prefill_kv

    def __enter__(self) -> "SummaryFastPath":
        return self

    def __exit__(self, *exc) -> None:
        self.store.clear()

    def prefill_batches(self, micro: list[dict]) -> list[dict]:
        from ..attention.megatron import gem_mask_info

        return [{**b, "attention_mask": self.store.bind(gem_mask_info(b["doc_ids"], b["roles"]), PREFILL, slot)} for slot, b in enumerate(micro)]

    def step_batches(self, micro: list[dict]) -> tuple[list[dict], int]:
        """The summary-step batch of each micro-batch (its gathered summary tokens, one width for
        the step: pipeline messages have one shape) and that width."""
        width = max(summary_width(b) for b in micro)
        return [self._step_batch(b, slot, width) for slot, b in enumerate(micro)], width

    def _step_batch(self, batch: dict, slot: int, width: int) -> dict:
        q = gather_summary_queries(batch, width=width)
        info = torch.stack([q["doc_ids"].long(), q["roles"].long(), q["index"].long()])
        out = {
            "input_ids": q["input_ids"],
            "position_ids": q["position_ids"],
            "doc_ids": q["doc_ids"],
            "roles": q["roles"],
            "attention_mask": self.store.bind(info, SUMMARY_STEP, slot),
            "labels": None,
            "ntp_rows": 0,
            "num_texts": batch["num_texts"],
            "num_negatives": batch["num_negatives"],
        }
        if batch.get("teacher") is not None:
            out["teacher"] = batch["teacher"]
        return out


class MegatronSummaryAdapter(nn.Module):
    """The deltas of one pipeline stage, keyed by GLOBAL megatron layer name
    ("decoder.layers.3.mlp.linear_fc1"), with a dist_checkpointing sharded_state_dict (keys
    independent of TP/PP). Same interface as gem.adapter.SummaryAdapter."""

    def __init__(self, deltas: dict[str, ParallelLowRankDelta], *, positions: str):
        super().__init__()
        self.names = list(deltas)
        self.positions = positions
        self.active = ActiveMask()
        self.deltas = nn.ModuleDict({adapter_key(n): d for n, d in deltas.items()})
        self.prefill_kv = PrefillKV()  # the fast path's per-call masks and recorded keys/values

    def delta_for(self, name: str) -> ParallelLowRankDelta:
        return self.deltas[adapter_key(name)]

    def set_positions(self, attention_mask: torch.Tensor | None) -> None:
        """From a layer's gem_mask_info [2, B, L] (or summary-step [3, B, S]) argument: the active
        rows as [L, B]; none for a fast-path prefill (the base model's keys and values)."""
        if attention_mask is None or self.prefill_kv.call_of(attention_mask)[0] == PREFILL:
            self.active.set(None)
            return
        from ..attention.megatron import split_mask_info

        doc_ids, roles = split_mask_info(attention_mask)
        self.active.set(self.active.rows_for((attention_mask,), lambda: adapter_active(roles, doc_ids, self.positions).transpose(0, 1)))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        out = {}
        for name in self.names:
            d = self.delta_for(name)
            for attr in ("lora_A", "lora_B"):
                key = f"{prefix}deltas.{adapter_key(name)}.{attr}"
                t = getattr(d, attr)
                if getattr(t, "tensor_model_parallel", False):
                    out[key] = make_tp_sharded_tensor_for_checkpoint(t, key, tp_axis=t.partition_dim)
                else:
                    out[key] = make_sharded_tensor_for_checkpoint(t, key)
        return out


def _fused_layer_of(name: str) -> str:
    return name.split(".", 3)[3]  # "decoder.layers.{i}.self_attention.linear_qkv" -> "self_attention.linear_qkv"


def attach_summary_adapter(model, config: GEMConfig, *, seed: int = 0) -> MegatronSummaryAdapter:
    """Freeze every parameter of this stage's GEMGPTModel but the InfoNCE logit scale, and hook
    a new adapter (rank/alpha/targets/positions of ``config``) onto its linear layers; the
    adapter becomes ``model.gem_adapter`` (so DDP, the optimizer and dist_checkpointing see it).
    megatron-core's parallel state must be initialised."""
    from megatron.core import parallel_state

    if model.config.sequence_parallel:
        raise ValueError(
            "--gem-train summary does not support --sequence-parallel: the deltas act on the full sequence of each layer input; drop one of the two flags"
        )
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    targets = megatron_targets(config.adapter_targets)
    offsets = layer_offsets(model)
    modules = dict(model.named_modules())
    r, dtype = config.adapter_rank, model.config.params_dtype
    device = next(model.parameters()).device
    deltas, hooked = {}, {}
    for local_index, layer in enumerate(offsets):
        for j, target in enumerate(targets):
            module = modules[f"decoder.layers.{local_index}.{target}"]
            kind = TARGETS[target][0]
            name = f"decoder.layers.{layer}.{target}"
            a = initial_lora_A(r, module.input_size, seed=seed, layer=layer, target=list(TARGETS).index(target))
            b = torch.zeros(module.output_size, r)
            if kind == "column":
                b = shard(name + ".weight", b, tp_rank, tp_size)
            else:
                a = shard(name + ".weight", a, tp_rank, tp_size)
            deltas[name] = ParallelLowRankDelta(a.to(device, dtype), b.to(device, dtype), alpha=config.adapter_alpha, parallel=kind)
            hooked[name] = module
    adapter = MegatronSummaryAdapter(deltas, positions=config.adapter_positions)
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "post_process", False) and hasattr(model, "logit_scale"):
        for p in model.logit_scale.parameters():
            p.requires_grad_(True)
    handles = []
    for name, module in hooked.items():
        delta = adapter.delta_for(name)

        def add_delta(mod, args, output, d=delta):
            out, bias = output
            return d(args[0], out, adapter.active.rows, in_place=True), bias  # ``out``: the linear's fresh output

        handles.append(module.register_forward_hook(add_delta))

    def set_rows(mod, args, kwargs):
        adapter.set_positions(kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None))

    handles.append(model.decoder.register_forward_pre_hook(lambda mod, args: adapter.active.begin_forward()))
    for layer in model.decoder.layers:
        handles.append(layer.register_forward_pre_hook(set_rows, with_kwargs=True))
        handles.append(layer.self_attention.core_attention.register_forward_pre_hook(_prefill_pre_hook(adapter.prefill_kv), with_kwargs=True))
    if getattr(model, "pre_process", False) and model.config.recompute_granularity is not None:
        # megatron-core's (reentrant) recomputation back-propagates through a recomputed layer
        # only when one of its inputs requires grad; the frozen embedding's output does not, so
        # the first stage's deltas would get no gradient (the enable_input_require_grads of HF).
        handles.append(model.embedding.register_forward_hook(lambda mod, args, out: out.requires_grad_(True)))
    adapter.hook_handles = handles
    setattr(model, ADAPTER_ATTR, adapter)  # after the freeze: the adapter's parameters train
    return adapter


def summary_adapter_of(model) -> MegatronSummaryAdapter | None:
    return getattr(model, ADAPTER_ATTR, None)


def detach_summary_adapter(model) -> MegatronSummaryAdapter | None:
    """Remove the hooks and the ``gem_adapter`` attribute (the base model again); returns the
    adapter. Parameters stay frozen."""
    adapter = summary_adapter_of(model)
    if adapter is not None:
        for h in adapter.hook_handles:
            h.remove()
        adapter.hook_handles = []
        adapter.active.forget()
        adapter.prefill_kv.clear()
        delattr(model, ADAPTER_ATTR)
    return adapter


# ------------------------------------------------------------------------------- HF mapping
def hf_adapter_tensors(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, arch) -> dict[str, torch.Tensor]:
    """HF-named deltas of one FULL (TP-gathered) megatron delta of global layer ``name``:
    {"model.layers.{i}.self_attn.q_proj.lora_A.weight": [r, in], "....lora_B.weight": [out, r], ...}
    (PEFT's key suffixes and shapes). Fused layers: A shared, B split like the weight."""
    i, target = int(name.split(".")[2]), _fused_layer_of(name)
    block, _ = target.split(".")
    hf_names = TARGETS[target][1]
    if target == "self_attention.linear_qkv":
        parts = split_qkv(lora_B, arch)
    elif target == "mlp.linear_fc1":
        parts = lora_B.chunk(2)
    else:
        parts = (lora_B,)
    out = {}
    for hf, b in zip(hf_names, parts):
        base = f"model.layers.{i}.{_HF_PREFIX[block]}.{hf}"
        out[base + ".lora_A.weight"] = lora_A.contiguous().clone()
        out[base + ".lora_B.weight"] = b.contiguous().clone()
    return out


def hf_adapter_state(model, arch) -> dict[str, torch.Tensor] | None:
    """The whole model's adapter as HF-named tensors (hf_adapter_tensors), CPU, on global rank 0
    (None elsewhere). Collective over all ranks: TP shards are gathered within each stage,
    then the stages' dicts go to rank 0."""
    from megatron.core import parallel_state

    from ..common import distributed as D
    from .checkpoint_io import gather_tp

    adapter = summary_adapter_of(model)
    if adapter is None:
        raise ValueError("the model has no summary adapter (GEMConfig.train_mode is not 'summary')")
    mine: dict[str, torch.Tensor] = {}
    first = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    for name in adapter.names:
        d = adapter.delta_for(name)
        a, b = d.lora_A.detach(), d.lora_B.detach()
        if d.parallel == "column":
            b = unshard(name + ".weight", gather_tp(b))
        else:
            a = unshard(name + ".weight", gather_tp(a))
        if first:
            mine.update({k: v.cpu() for k, v in hf_adapter_tensors(name, a, b, arch).items()})
    gathered = D.gather_object(mine if first else None, dst=0)
    if not D.is_main():
        return None
    state = {}
    for part in gathered:
        state.update(part or {})
    return dict(sorted(state.items()))


def load_hf_adapter_state(adapter, state: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors (hf_adapter_state) into an HF-side gem.adapter.SummaryAdapter whose
    names are HF module names (hf.summary.attach_summary_adapter); every delta must be present."""
    missing = [n for n in adapter.names if f"{n}.lora_A.weight" not in state or f"{n}.lora_B.weight" not in state]
    extra = sorted(set(state) - {f"{n}.{w}.weight" for n in adapter.names for w in ("lora_A", "lora_B")})
    if missing or extra:
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n in adapter.names:
            d = adapter.delta_for(n)
            d.lora_A.copy_(state[f"{n}.lora_A.weight"])
            d.lora_B.copy_(state[f"{n}.lora_B.weight"])
