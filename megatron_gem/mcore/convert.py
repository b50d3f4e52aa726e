"""Checkpoint conversions behind tools/convert_checkpoint.py and tools/add_gem_tokens.py.

  hf_to_megatron     HF safetensors dir -> megatron-core dist_checkpointing dir (reshardable)
  megatron_to_hf     back; bit-equal weights, padding rows dropped
  deepspeed_to_hf    a checkpoint of the DeepSpeed path -> HF (hf/deepspeed_checkpoint.py; re-exported here)
  add_gem_tokens_to_hf_dir   extend an HF checkpoint with the K GEM tokens (mean-row init)

The megatron conversions run in one process (``runtime.init_model_parallel(1, 1)`` first):
dist_checkpointing stores global tensors with their sharding, so a checkpoint written for the
unsplit (meta-device) model loads at any TP/PP. The requested TP decides the vocabulary padding (a multiple
of make_vocab_size_divisible_by x TP) and TP/PP are recorded in megatron_gem.json.
hf_to_megatron, megatron_to_hf and add_gem_tokens_to_hf_dir stream tensor by tensor
(``lazy_checkpoint_io``): peak memory is about one layer, whatever the model size.
Every output directory is built beside ``out_dir`` under a fresh hidden name, gets a manifest
(sizes) and is renamed into place when complete (common/outputs.py: a non-empty target only
with ``overwrite``, and then only the files its manifest lists are replaced).
"""

from __future__ import annotations

import os
import re
import shutil

import torch

from ..common.files import write_json_atomic
from ..common.manifest import write_manifest
from ..common.outputs import building_dir, replace_dir_atomic
from ..gem.config import CONFIG_NAME, GEMConfig
from ..hf.deepspeed_checkpoint import deepspeed_to_hf  # noqa: F401  (the converters' one home for callers)
from . import checkpoint_io as io
from .hf_mapping import HFWeights, hf_from_megatron, megatron_from_hf
from .llama import LlamaArch, arch_from_hf_config, padded_vocab_size, transformer_config


def _load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None  # weights-only checkpoint


def _meta_gem_model(arch, *, vocab: int, padded: int, dtype: torch.dtype):
    """The TP=PP=1 GEM GPTModel on the meta device (layout only); GEM's logit scale is built for
    real (its initial value is what a fresh model saves)."""
    from ..gem.losses import LogitScale

    config = transformer_config(arch, params_dtype=dtype)
    from .gpt_model import build_gem_gpt_model  # megatron-core: imported when a model is built

    with torch.device("meta"):
        model = build_gem_gpt_model(arch, config, vocab_size=vocab, padded_vocab=padded, pre_process=True, post_process=True)
    init = model.logit_scale.log_scale  # meta; rebuild with the constructor's defaults
    model.logit_scale = LogitScale()
    assert model.logit_scale.log_scale.shape == init.shape
    return model


def hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int, pp: int, divisible_by: int = 128, progress: bool = True, overwrite: bool = False, log=print) -> dict:
    """Convert, tensor by tensor (peak memory about one layer); returns the written
    megatron_gem.json content. ``overwrite``: see the module docstring."""
    from transformers import AutoConfig

    from . import lazy_checkpoint_io

    hf_config = AutoConfig.from_pretrained(hf_dir)
    arch = arch_from_hf_config(hf_config)
    weights = HFWeights(hf_dir)
    (vocab, _), dtype = weights.info("model.embed_tokens.weight")
    arch.vocab_size = vocab
    padded = padded_vocab_size(vocab, tp, divisible_by)
    # Validates the split (heads, KV heads, FFN, layers) now, not when someone loads it.
    from .llama import check_parallel_sizes

    check_parallel_sizes(arch, tp, pp)
    model = _meta_gem_model(arch, vocab=vocab, padded=padded, dtype=dtype)
    log(f"[convert] {hf_dir}: {arch.architecture}, {arch.num_layers} layers, vocab {vocab} -> padded {padded} (TP={tp}), dtype {dtype}")
    with building_dir(out_dir) as tmp:
        # (A tied model has no output_layer parameter at PP=1: the embedding is the head.)
        lazy_checkpoint_io.save_dist_checkpoint_lazily(model, tmp, lambda name: megatron_from_hf(name, weights, arch, padded), progress=progress)
        meta = io.make_meta(arch, vocab_size=vocab, padded_vocab=padded, tp=tp, pp=pp, hf_config=hf_config.to_dict(), divisible_by=divisible_by)
        meta["dtype"] = str(dtype).replace("torch.", "")
        write_json_atomic(os.path.join(tmp, io.META_NAME), meta)
        tok = _load_tokenizer(hf_dir)
        if tok is not None:
            tok.save_pretrained(tmp)
        if os.path.isfile(os.path.join(hf_dir, CONFIG_NAME)):
            GEMConfig.load(hf_dir).save(tmp)
        write_manifest(tmp, digests=False)
    replace_dir_atomic(tmp, out_dir, overwrite=overwrite, flag="--output")
    log(f"[convert] wrote megatron-core dist checkpoint {out_dir} (loads at any TP/PP; made for TP={tp}, PP={pp})")
    return meta


def build_from_meta(meta: dict, *, tp: int = 1, pp: int = 1, **kwargs):
    """An (unloaded) GEM GPTModel for a checkpoint's metadata at the current parallel layout."""
    from .llama import LlamaArch

    arch = LlamaArch.from_dict(meta["arch"])
    dtype = getattr(torch, meta.get("dtype", "float32"))
    config = transformer_config(arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype, **kwargs)
    from .gpt_model import build_gem_gpt_model  # megatron-core: imported when a model is built

    model = build_gem_gpt_model(arch, config, vocab_size=meta["vocab_size"], padded_vocab=meta["padded_vocab_size"])
    return arch, model


def megatron_to_hf(megatron_dir: str, out_dir: str, *, max_shard_size: str = "5GB", progress: bool = True, overwrite: bool = False, log=print) -> str:
    """Megatron dist checkpoint (converted or trained, any TP/PP) -> HF safetensors, one group of
    parameters at a time (peak memory about one layer, whatever ``max_shard_size``)."""
    from . import lazy_checkpoint_io

    meta = io.read_meta(megatron_dir)
    log(
        f"[convert] {megatron_dir}: made for TP={meta['tensor_model_parallel_size']}, PP={meta['pipeline_model_parallel_size']}; "
        f"vocab {meta['vocab_size']} (padded {meta['padded_vocab_size']})"
    )
    arch = LlamaArch.from_dict(meta["arch"])
    model = _meta_gem_model(arch, vocab=meta["vocab_size"], padded=meta["padded_vocab_size"], dtype=getattr(torch, meta.get("dtype", "float32")))
    tok = _load_tokenizer(megatron_dir)
    gem = GEMConfig.load(megatron_dir) if os.path.isfile(os.path.join(megatron_dir, CONFIG_NAME)) else None

    def hf_tensors(name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
        if name.startswith("logit_scale."):
            return {}  # GEM's training-only temperature (a tied model has no output_layer here)
        return hf_from_megatron(name, full, arch, meta["vocab_size"])

    # The HF tensors' names and shapes come from the same mapping run on the meta model.
    plan = [(k, tuple(t.shape), t.dtype) for group in lazy_checkpoint_io.parameter_groups(model) for name, p in group for k, t in hf_tensors(name, p).items()]
    with building_dir(out_dir) as tmp:
        shards = lazy_checkpoint_io.SafetensorsShardWriter(tmp, plan, lazy_checkpoint_io.parse_size(max_shard_size))
        # Reading the next group overlaps writing this one.
        for group in lazy_checkpoint_io.prefetched(lazy_checkpoint_io.iter_dist_checkpoint_groups(model, megatron_dir, progress=progress)):
            for name, full in group.items():
                for hf_name, t in hf_tensors(name, full).items():
                    shards.add(hf_name, t)
            del group
        weight_map, total = shards.close()
    io.finish_hf_dir(
        tmp,
        out_dir,
        config=io.hf_config_dict(meta["hf_config"], meta["vocab_size"], for_generation=False),
        weight_map=weight_map,
        total_size=total,
        tokenizer=tok,
        gem_config=gem,
        source=f"tools/convert_checkpoint.py megatron-to-hf from `{megatron_dir}`",
        digests=False,
        overwrite=overwrite,
    )
    log(f"[convert] wrote HF checkpoint {out_dir} ({len(set(weight_map.values()))} safetensors file(s))")
    return out_dir


def add_gem_tokens_to_hf_dir(
    in_dir: str, out_dir: str, gem_config: GEMConfig, *, max_shard_size: str = "5GB", progress: bool = True, overwrite: bool = False, log=print
) -> list[int]:
    """Extend an HF checkpoint (safetensors) with the GEM tokens; writes gem_config.json with their
    ids. Idempotent on a checkpoint that already has them. Streams tensor by tensor (an 8B model
    never sits in memory): only the embedding and an untied LM head change, their new rows set
    like ``gem.tokens.add_gem_tokens`` does on a live model (the test's reference)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from ..gem.tokens import find_gem_tokens, mean_row
    from . import lazy_checkpoint_io

    weights = HFWeights(in_dir)  # refuses non-safetensors checkpoints with a message
    tokenizer = AutoTokenizer.from_pretrained(in_dir)
    hf_config = AutoConfig.from_pretrained(in_dir)
    shapes, dtypes = {}, {}
    for name in weights.where:
        shapes[name], dtypes[name] = weights.info(name)
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError(f"{in_dir}: no model.embed_tokens.weight; not a Llama-family HF checkpoint")
    before = shapes["model.embed_tokens.weight"][0]
    ids = find_gem_tokens(tokenizer, gem_config)
    if ids is None:
        tokenizer.add_special_tokens({"additional_special_tokens": gem_config.special_tokens}, replace_extra_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids(gem_config.special_tokens)
        init_ids = list(ids)
    elif max(ids) >= before:
        raise ValueError(
            f"tokenizer has GEM token id {max(ids)} but the model has only {before} embedding rows: the model and tokenizer come from different checkpoints"
        )
    else:
        init_ids = []  # already a GEM checkpoint: copied unchanged
    gem_config.special_token_ids = list(ids)
    rows = max(before, len(tokenizer))
    resized = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in shapes]
    for n in resized:
        if shapes[n][0] != before:
            raise ValueError(f"{in_dir}: {n} has {shapes[n][0]} rows, the embedding {before}")
        shapes[n] = (rows, *shapes[n][1:])
    order = sorted(shapes, key=_hf_tensor_order)
    with building_dir(out_dir) as tmp:
        writer = lazy_checkpoint_io.SafetensorsShardWriter(tmp, [(n, shapes[n], dtypes[n]) for n in order], lazy_checkpoint_io.parse_size(max_shard_size))
        for name in tqdm(order, desc="add_gem_tokens", unit="tensor", disable=not progress, mininterval=2.0):
            t = weights(name)
            if name in resized:
                # A new tensor either way (the read one may be backed by the file's mapping).
                t = torch.cat([t, t.new_zeros(rows - before, *t.shape[1:])]) if rows > before else t.clone()
                if init_ids:
                    t[torch.as_tensor(init_ids)] = mean_row(t, before)
            writer.add(name, t)
            del t
        weight_map, total = writer.close()
        if os.path.isfile(os.path.join(in_dir, "generation_config.json")):
            shutil.copy(os.path.join(in_dir, "generation_config.json"), tmp)
    config = hf_config.to_dict()
    config["vocab_size"] = rows
    io.finish_hf_dir(
        tmp,
        out_dir,
        config=config,
        weight_map=weight_map,
        total_size=total,
        tokenizer=tokenizer,
        gem_config=gem_config,
        source=f"tools/add_gem_tokens.py from `{in_dir}` (GEM tokens added with mean rows, not trained)",
        digests=False,
        overwrite=overwrite,
    )
    log(f"[add_gem_tokens] {in_dir}: tokens {gem_config.special_tokens} -> ids {ids}; embedding rows {before} -> {rows}; wrote {out_dir}")
    return list(ids)


def _hf_tensor_order(name: str):
    """Embedding first, then layers in numeric order, then the rest (HF's usual file order)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed_tokens" in name else 2, 0, name)
