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
The deltas' initial values depend only on the seed and the global layer (a full A is drawn,
then sliced), so every TP x PP layout starts from the single-process adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..gem.adapter import ActiveMask, LowRankDelta, adapter_active, adapter_key
from ..gem.config import GEMConfig
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
        from ..attention.megatron import PrefillKV  # imports megatron-core: not at module level

        self.suspended = False  # True: the deltas act nowhere (the phase-2 fast path's prefill)
        self.prefill_kv = PrefillKV()  # that prefill's keys/values, read by its summary step

    def delta_for(self, name: str) -> ParallelLowRankDelta:
        return self.deltas[adapter_key(name)]

    def set_positions(self, attention_mask: torch.Tensor | None) -> None:
        """From a layer's gem_mask_info [2, B, L] (or summary_query_info) argument: the active rows
        as [L, B]."""
        if attention_mask is None or self.suspended:
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
        layer.self_attention.core_attention.prefill_kv = adapter.prefill_kv
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
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.prefill_kv = None
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
