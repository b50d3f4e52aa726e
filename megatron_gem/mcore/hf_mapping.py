"""HF Llama/Mistral <-> megatron-core GPTModel state-dict mapping.

Three layers, each a pure function of tensors:
  full (TP=1) megatron tensor  <-  HF tensors       ``megatron_from_hf``   / ``hf_from_megatron``
  TP shard of rank r           <-  full tensor      ``shard``              / ``unshard``
  a live model's local keys    <-  global names     ``global_name``        (pipeline stage offset)

Layouts (megatron-core, local spec):
  linear_qkv  rows grouped per KV head: for each of the G groups, its Hq/G query heads, then its
              key head, then its value head (each head_dim rows). A contiguous TP slice thus
              holds whole groups, which is why TP must divide the KV heads.
  linear_fc1  [gate; up] (SwiGLU). A TP shard is [gate slice; up slice], not a slice of the
              concatenation.
  embedding / output_layer rows padded with zeros to the padded vocabulary; the padding is
              dropped again on the way back.
  Q/K rows are not permuted: both sides use the rotate-half RoPE layout (see mcore.llama).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable

import torch

from .llama import LlamaArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix inside a layer -> HF suffix inside model.layers.{i}
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# TP split dimension of each parameter kind (None: replicated).
_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.final_layernorm.weight": None,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
}


def _kind(name: str) -> str:
    m = _LAYER.match(name)
    return m.group(2) if m else name


# ---------------------------------------------------------------------------------- QKV layout
def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch) -> torch.Tensor:
    """HF q/k/v projections [Hq*D, h], [G*D, h], [G*D, h] -> megatron linear_qkv [(Hq+2G)*D, h]."""
    G, D = arch.num_key_value_heads, arch.head_dim
    per = arch.num_attention_heads // G
    h = q.shape[-1]
    return torch.cat([q.reshape(G, per, D, h), k.reshape(G, 1, D, h), v.reshape(G, 1, D, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_qkv."""
    G, D = arch.num_key_value_heads, arch.head_dim
    per = arch.num_attention_heads // G
    h = qkv.shape[-1]
    grouped = qkv.reshape(G, per + 2, D, h)
    q = grouped[:, :per].reshape(-1, h)
    k = grouped[:, per].reshape(-1, h)
    v = grouped[:, per + 1].reshape(-1, h)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary of {t.shape[0]} rows does not fit the padded size {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ------------------------------------------------------------------------------ full <-> HF
def megatron_from_hf(name: str, get_hf: Callable[[str], torch.Tensor], arch: LlamaArch, padded_vocab: int) -> torch.Tensor:
    """The full (TP=1) tensor of global megatron parameter ``name`` built from HF tensors."""
    if name == "embedding.word_embeddings.weight":
        return _pad_rows(get_hf("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        return _pad_rows(get_hf("lm_head.weight"), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get_hf("model.norm.weight")
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    p = f"model.layers.{i}."
    if rest in _LAYER_SIMPLE:
        return get_hf(p + _LAYER_SIMPLE[rest])
    if rest == "self_attention.linear_qkv.weight":
        return interleave_qkv(get_hf(p + "self_attn.q_proj.weight"), get_hf(p + "self_attn.k_proj.weight"), get_hf(p + "self_attn.v_proj.weight"), arch)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get_hf(p + "mlp.gate_proj.weight"), get_hf(p + "mlp.up_proj.weight")])
    raise KeyError(f"no HF counterpart for megatron parameter {name!r}")


def hf_from_megatron(name: str, full: torch.Tensor, arch: LlamaArch, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF tensors of one full (TP-gathered) megatron parameter; padding rows removed."""
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": full[:vocab_size].contiguous()}
    if name == "output_layer.weight":
        return {"lm_head.weight": full[:vocab_size].contiguous()}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": full}
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    p = f"model.layers.{i}."
    if rest in _LAYER_SIMPLE:
        return {p + _LAYER_SIMPLE[rest]: full}
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = split_qkv(full, arch)
        return {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v}
    if rest == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2)
        return {p + "mlp.gate_proj.weight": gate.contiguous(), p + "mlp.up_proj.weight": up.contiguous()}
    raise KeyError(f"no HF counterpart for megatron parameter {name!r}")


# ----------------------------------------------------------------------------- TP sharding
def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s slice of a full megatron parameter."""
    kind = _kind(name)
    dim = _SPLIT_DIM[kind]
    if dim is None or tp_size == 1:
        return full
    if kind == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]]).contiguous()
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} is not divisible by TP={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard: the full parameter from all TP ranks' slices (in rank order)."""
    kind = _kind(name)
    dim = _SPLIT_DIM[kind]
    if dim is None or len(shards) == 1:
        return shards[0]
    if kind == "mlp.linear_fc1.weight":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=dim)


# ------------------------------------------------------------------ live model (one stage)
def layer_offsets(model) -> list[int]:
    """Global layer index of each local layer of this pipeline stage."""
    return [layer.layer_number - 1 for layer in model.decoder.layers]


# TransformerEngine's layer spec fuses each pre-norm into the linear after it
# (TELayerNormColumnParallelLinear), so its weight is named after that linear. megatron-core's
# local spec maps its names to these in sharded_state_dict_keys_map: dist checkpoints of both
# specs have the same keys. The mapping here reads plain state-dict names: TE's go back to the
# local spec's ones, so both specs load and export HF checkpoints alike.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def global_name(local: str, offsets: list[int]) -> str:
    """The global (pipeline-offset) name of a local parameter, in the local spec's names."""
    m = _LAYER.match(local)
    if m is None:
        return local
    rest = _TE_FUSED_NORMS.get(m.group(2), m.group(2))
    return f"decoder.layers.{offsets[int(m.group(1))]}.{rest}"


def _is_gem_extra(name: str) -> bool:
    # GEM's own parameters (the InfoNCE logit scale, the summary-mode adapter) and megatron's
    # non-tensor extra state.
    return name.startswith(("logit_scale.", "gem_adapter.")) or name.endswith("_extra_state")


def load_hf_into_model(model, get_hf: Callable[[str], torch.Tensor], arch: LlamaArch, *, tp_rank: int, tp_size: int) -> None:
    """Fill this rank's GEMGPTModel parameters from HF tensors (``get_hf(name)``)."""
    offsets = layer_offsets(model)
    padded = model.vocab_size
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for local, param in own.items():
            if _is_gem_extra(local) or not isinstance(param, torch.Tensor):
                continue
            name = global_name(local, offsets)
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
            full = megatron_from_hf(name, get_hf, arch, padded)
            part = shard(name, full, tp_rank, tp_size)
            if part.shape != param.shape:
                raise ValueError(f"{local}: converted shape {tuple(part.shape)} != model shape {tuple(param.shape)}")
            param.copy_(part.to(param.dtype))


def stage_megatron_tensors(model) -> Iterable[tuple[str, torch.Tensor]]:
    """(global name, local TP shard) of this stage's parameters, model order; the tied output
    layer copy of a last stage is skipped (the embedding carries it)."""
    offsets = layer_offsets(model)
    for local, t in model.state_dict().items():
        if _is_gem_extra(local) or not isinstance(t, torch.Tensor):
            continue
        if local == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue
        yield global_name(local, offsets), t


# ----------------------------------------------------------------------- HF checkpoint I/O
SAFETENSORS_DTYPE_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
SAFETENSORS_DTYPE = {name: dtype for dtype, name in SAFETENSORS_DTYPE_NAME.items()}


class HFWeights:
    """Lazy reader of an HF safetensors checkpoint (one file or an index of shards): tensors are
    read one at a time, so a pipeline stage reads only its own layers."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            bins = [n for n in os.listdir(directory) if n.endswith(".bin")] if os.path.isdir(directory) else []
            hint = " (found PyTorch .bin weights: re-save them as safetensors with save_pretrained(safe_serialization=True))" if bins else ""
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")
        self.overrides: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return sorted(set(self.where) | set(self.overrides))

    def __contains__(self, name: str) -> bool:
        return name in self.overrides or name in self.where

    def _file(self, name: str) -> tuple[str, str]:
        if name == "lm_head.weight" and name not in self.where:
            name = "model.embed_tokens.weight"  # tied checkpoints store one copy
        if name not in self.where:
            raise KeyError(f"{self.directory}: tensor {name!r} not in the checkpoint")
        return name, os.path.join(self.directory, self.where[name])

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name]
        from safetensors import safe_open

        name, path = self._file(name)
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a stored tensor, from the file header (no data read)."""
        from safetensors import safe_open

        name, path = self._file(name)
        with safe_open(path, framework="pt") as f:
            sl = f.get_slice(name)
            return tuple(sl.get_shape()), SAFETENSORS_DTYPE[sl.get_dtype()]


def dict_getter(state_dict: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``get_hf`` over an in-memory HF state dict (tied models may lack lm_head.weight)."""

    def get(name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in state_dict:
            name = "model.embed_tokens.weight"
        return state_dict[name]

    return get
