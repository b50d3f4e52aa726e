"""The HF export of an HF causal LM trained by the DeepSpeed engine: safetensors, config,
tokenizer with the GEM tokens, gem_config.json, the sentence-transformers files and the model
card (``add_embedder_files``, which every HF export of the project runs), manifest.json; written
to a temporary directory and swapped in atomically. Collective under ZeRO-3 (parameters
gathered one at a time)."""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..common import distributed as D
from ..common.files import replace_dir_atomic, write_text_atomic
from ..common.manifest import write_manifest
from ..gem.config import CONFIG_NAME, GEMConfig
from .model_card import write_model_card
from .sentence_transformers import save_sentence_transformer


def _full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copy of ``module``'s parameters (ZeRO-3: gathered one at a time) on rank 0;
    other ranks get an empty dict."""
    out = {}
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    if zero3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if D.is_main():
                    out[name] = p.data.detach().cpu().clone()
    elif D.is_main():
        out = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return out


def add_embedder_files(directory: str, *, source: str | None = None, name: str | None = None) -> str | None:
    """Make the HF checkpoint in ``directory`` embedder-ready: the sentence-transformers files
    (so ``SentenceTransformer(directory)`` gives GEMEmbedder's vectors rather than mean-pooling
    the plain model) and the model card. Call before its manifest is written. Returns the
    sentence-transformers mode, or None when nothing was written (no gem_config.json: not a GEM
    checkpoint; summary-mode checkpoints: their embeddings need the adapter, which the
    sentence-transformers files do not load, so none are written). ``name``: the directory the
    export ends up in (the model card's usage lines)."""
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return None
    mode = None if GEMConfig.load(directory).summary_mode else save_sentence_transformer(directory)
    write_model_card(directory, source=source, name=name)
    return mode


SUMMARY_ADAPTER_FILE = "adapter_model.safetensors"


def write_hf_adapter_state(state: dict[str, torch.Tensor], gem_config, out_dir: str, *, tokenizer=None, extra: dict | None = None) -> str:
    """Summary mode: write the adapter alone (the base model is ``gem_config.base_model``,
    unchanged): ``state`` = HF-named deltas ("model.layers.{i}.self_attn.q_proj.lora_A.weight"
    [r, in], "...lora_B.weight" [out, r]) as safetensors, gem_config.json, the tokenizer,
    manifest.json; to a temporary directory swapped in atomically. Not collective: call on the
    one rank holding ``state``."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, SUMMARY_ADAPTER_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    gem_config.save(tmp)
    if extra:
        write_text_atomic(os.path.join(tmp, "training_info.json"), json.dumps(extra, indent=2) + "\n")
    write_manifest(tmp)
    return replace_dir_atomic(tmp, out_dir)


def export_hf(lm, tokenizer, gem_config, out_dir: str, *, extra: dict | None = None) -> str | None:
    """Write an HF checkpoint (safetensors, config, tokenizer with the GEM tokens,
    gem_config.json) to ``out_dir`` atomically. Collective under ZeRO-3: call on all ranks."""
    state = _full_state_dict(lm)
    path = None
    if D.is_main():
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gem_config.save(tmp)
        if extra:
            write_text_atomic(os.path.join(tmp, "training_info.json"), json.dumps(extra, indent=2) + "\n")
        add_embedder_files(tmp, name=out_dir)
        write_manifest(tmp)
        path = replace_dir_atomic(tmp, out_dir)
    D.barrier()
    return path


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_summary_adapter(lm, adapter, tokenizer, config, out_dir: str, extra: dict | None = None) -> str | None:
    """Summary mode's export (interim: the export work replaces it with the PEFT aLoRA folder):
    the adapter's state dict as ``adapter_model.safetensors`` (ZeRO-3: gathered), the tokenizer
    (unchanged: summary tokens are existing ones), gem_config.json (base model, summary tokens),
    training_info.json and manifest.json; no base weights. ``lm`` is the frozen base the adapter
    belongs to (unused here: the base checkpoint is ``config.base_model``). Collective."""
    from safetensors.torch import save_file

    state = _full_state_dict(adapter)
    path = None
    if D.is_main():
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, ADAPTER_WEIGHTS))
        tokenizer.save_pretrained(tmp)
        config.save(tmp)
        if extra:
            write_text_atomic(os.path.join(tmp, "training_info.json"), json.dumps(extra, indent=2) + "\n")
        write_manifest(tmp)
        path = replace_dir_atomic(tmp, out_dir)
    D.barrier()
    return path
