"""Checkpoints of the megatron-core GEM model: megatron-core dist_checkpointing (reshardable:
save at one TP/PP, load at another) plus a small JSON describing the model, and HF
safetensors output written stage by stage.

A converted or trained megatron checkpoint directory:
    megatron_gem.json        format version, architecture, vocab sizes, TP/PP it was made for,
                             the HF config it came from
    dist_checkpointing files (megatron-core's own format: .metadata, common.pt, *.distcp)
                             of {"model": GPTModel sharded state dict} (training checkpoints
                             add "optimizer")
    tokenizer files, gem_config.json (when the model has GEM tokens)
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from ..common import distributed as D
from ..common.files import replace_dir_atomic, write_json_atomic
from ..common.manifest import write_manifest
from ..hf.export import add_embedder_files
from .llama import LlamaArch

META_NAME = "megatron_gem.json"
FORMAT_VERSION = 1
# Key of megatron_gem.json in a summary-mode training checkpoint: it holds the adapter, the
# logit scale and their optimizer state only; {"base": the --model its frozen base is}.
ADAPTER_ONLY = "adapter_only"


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {META_NAME}; not a megatron-gem megatron checkpoint")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} (this code reads {FORMAT_VERSION})")
    if ADAPTER_ONLY in meta:
        raise ValueError(
            f"{directory}: a summary-mode training checkpoint: it holds the adapter, the logit scale and their optimizer state, "
            f"not the frozen base (that is {meta[ADAPTER_ONLY].get('base')}, never rewritten); resume it with train.py --load, "
            f"or use the run's adapter export (<--save>/hf)"
        )
    return meta


def is_megatron_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META_NAME))


def make_meta(arch: LlamaArch, *, vocab_size: int, padded_vocab: int, tp: int, pp: int, hf_config: dict, divisible_by: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch.to_dict(),
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab,
        "make_vocab_size_divisible_by": divisible_by,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "hf_config": hf_config,
    }


def save_model(model, directory: str) -> None:
    """dist_checkpointing save of ``model`` (collective over all ranks) into ``directory``."""
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, directory)


def load_model(model, directory: str) -> None:
    """Load the model part of ``directory`` into ``model`` at whatever TP/PP it was built with."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)["model"]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


# ------------------------------------------------------------------------------ HF output
def hf_config_dict(hf_config_or_dict, vocab_size: int, *, for_generation: bool = True) -> dict:
    """The HF config to write: the recorded one with the real vocabulary size; a training
    export (``for_generation``) turns the KV cache back on, which training code turns off.
    The converter keeps the recorded config as it is (round trips are exact)."""
    d = hf_config_or_dict if isinstance(hf_config_or_dict, dict) else hf_config_or_dict.to_dict()
    d = dict(d)
    d["vocab_size"] = vocab_size
    if for_generation:
        d["use_cache"] = True
    return d


def write_hf_shard(tmp_dir: str, tensors: dict[str, torch.Tensor], shard_index: int, num_shards: int) -> tuple[str, dict[str, str], int]:
    """Write one safetensors file of an HF checkpoint; returns (file name, weight map, bytes)."""
    from safetensors.torch import save_file

    name = "model.safetensors" if num_shards == 1 else f"model-{shard_index + 1:05d}-of-{num_shards:05d}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(tmp_dir, name), metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return name, {k: name for k in tensors}, size


def finish_hf_dir(
    tmp_dir: str,
    out_dir: str,
    *,
    config: dict,
    weight_map: dict[str, str],
    total_size: int,
    tokenizer=None,
    gem_config=None,
    extra: dict | None = None,
    manifest: bool = False,
    source: str | None = None,
) -> str:
    """Write config/index/tokenizer/gem_config, with a GEM config the sentence-transformers files
    and the model card (``add_embedder_files``; ``source`` says in the card what wrote it), and,
    with ``manifest``, manifest.json last into ``tmp_dir``; swap it in as ``out_dir``."""
    from transformers import AutoConfig

    files = sorted(set(weight_map.values()))
    if len(files) > 1:
        write_json_atomic(
            os.path.join(tmp_dir, "model.safetensors.index.json"), {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        )
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("transformers_version",)}).save_pretrained(tmp_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    if gem_config is not None:
        gem_config.save(tmp_dir)
    if extra:
        write_json_atomic(os.path.join(tmp_dir, "training_info.json"), extra)
    if gem_config is not None and tokenizer is not None:
        add_embedder_files(tmp_dir, source=source, name=out_dir)
    if manifest:
        write_manifest(tmp_dir)
    return replace_dir_atomic(tmp_dir, out_dir)


def gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    """All TP ranks' slices of a parameter, in rank order (collective over the TP group)."""
    from megatron.core import parallel_state

    return D.all_gather_tensors(t, parallel_state.get_tensor_model_parallel_group())


def export_hf_from_model(
    model,
    arch: LlamaArch,
    out_dir: str,
    *,
    hf_config: dict,
    vocab_size: int,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    gem_config=None,
    extra: dict | None = None,
) -> str | None:
    """Write the HF checkpoint of a (TP/PP-split) GEM GPTModel. Collective over all ranks: each
    pipeline stage's first TP rank of data-parallel replica 0 writes that stage's safetensors
    shard, global rank 0 the rest; returns out_dir on rank 0."""
    from megatron.core import parallel_state

    from .hf_mapping import hf_from_megatron, stage_megatron_tensors, unshard

    pp_rank, pp_size = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size()
    writer = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    tmp = out_dir.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    D.barrier()
    tensors: dict[str, torch.Tensor] = {}
    if parallel_state.get_data_parallel_rank() == 0:
        for name, local in stage_megatron_tensors(model):
            full = unshard(name, gather_tp(local))
            if writer:
                for k, v in hf_from_megatron(name, full, arch, vocab_size).items():
                    tensors[k] = v.to(dtype) if dtype is not None else v
    info = write_hf_shard(tmp, tensors, pp_rank, pp_size) if writer else None
    gathered = D.all_gather_object(info)
    result = None
    if dist.get_rank() == 0:
        weight_map, total = {}, 0
        for item in gathered:
            if item is not None:
                weight_map.update(item[1])
                total += item[2]
        result = finish_hf_dir(
            tmp,
            out_dir,
            config=hf_config_dict(hf_config, vocab_size),
            weight_map=weight_map,
            total_size=total,
            tokenizer=tokenizer,
            gem_config=gem_config,
            extra=extra,
            manifest=True,
        )
    D.barrier()
    return result
