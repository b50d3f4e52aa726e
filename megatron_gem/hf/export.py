"""The HF export of an HF causal LM trained by the DeepSpeed engine: safetensors, config,
tokenizer with the GEM tokens, gem_config.json, the sentence-transformers files and the model
card (``add_embedder_files``, which every HF export of the project runs), manifest.json; written
to a temporary directory and swapped in atomically. Collective under ZeRO-3 (parameters
gathered one at a time)."""

from __future__ import annotations

import json
import os

import torch

from ..common import distributed as D
from ..common.files import write_text_atomic
from ..common.manifest import write_manifest
from ..common.outputs import building_dir, replace_dir_atomic
from ..gem.config import CONFIG_NAME, GEMConfig
from .model_card import write_model_card
from .sentence_transformers_files import save_sentence_transformer


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
    checkpoint, or the full weights of a summary-mode run, i.e. its unchanged base, whose
    embeddings need the adapter). A summary-mode adapter folder gets the custom module, which
    loads the base and the deltas (the builtin modules would load the base alone). ``name``: the directory the
    export ends up in (the model card's usage lines)."""
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return None
    from .summary_files import ADAPTER_CONFIG

    if not GEMConfig.load(directory).summary_mode:
        mode = save_sentence_transformer(directory)
    elif os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):  # the adapter folder itself
        mode = save_sentence_transformer(directory, mode="custom")
    else:  # the frozen base of a summary-mode run (converted): its embeddings need the adapter
        mode = None
    write_model_card(directory, source=source, name=name)
    return mode


def _vocab_rows_dropped(lm, state: dict, vocab_size: int | None) -> dict:
    """``state`` with the input embedding and LM head cut to ``vocab_size`` rows (the training-
    time padding of gem.tokens.pad_vocab_rows); unchanged when None."""
    if vocab_size is None:
        return state
    matrices = {id(lm.get_input_embeddings().weight)}
    head = lm.get_output_embeddings()
    if head is not None:
        matrices.add(id(head.weight))
    names = {name for name, p in lm.named_parameters(remove_duplicate=False) if id(p) in matrices}
    return {k: (v[:vocab_size].contiguous() if k in names and v.shape[0] > vocab_size else v) for k, v in state.items()}


def export_hf(lm, tokenizer, gem_config, out_dir: str, *, extra: dict | None = None, vocab_size: int | None = None) -> str | None:
    """Write an HF checkpoint (safetensors, config, tokenizer with the GEM tokens,
    gem_config.json) to ``out_dir`` atomically. An existing ``out_dir`` loses only what its
    manifest lists (common/outputs.py). ``vocab_size``: the real vocabulary when the model's rows
    are padded for training (gem.tokens.pad_vocab_rows): the export has exactly that many rows, as
    the tokenizer, so no padding row reaches a user's logits. Collective under ZeRO-3: call on all
    ranks."""
    state = _vocab_rows_dropped(lm, _full_state_dict(lm), vocab_size)
    path = None
    if D.is_main():
        with building_dir(out_dir) as tmp:
            padded = lm.config.vocab_size
            if vocab_size is not None:
                lm.config.vocab_size = vocab_size  # the config written beside the cut tensors
            try:
                lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                lm.config.vocab_size = padded
            tokenizer.save_pretrained(tmp)
            gem_config.save(tmp)
            if extra:
                write_text_atomic(os.path.join(tmp, "training_info.json"), json.dumps(extra, indent=2) + "\n")
            add_embedder_files(tmp, name=out_dir)
            write_manifest(tmp)
        path = replace_dir_atomic(tmp, out_dir, overwrite=True)
    D.barrier()
    return path


def export_summary_adapter(
    lm, adapter, tokenizer, config, out_dir: str, extra: dict | None = None, *, base_path: str, self_contained: bool = False
) -> str | None:
    """Write a summary-mode adapter folder (hf/summary_files.py: PEFT aLoRA files + gem_config
    + tokenizer + manifest) to ``out_dir`` atomically. ``base_path``: the base checkpoint
    directory the run started from (its weight digest goes into gem_config.json; refused when
    it differs from config.base_model_digest). ``self_contained``: also copy the base's config
    and weight files to ``out_dir/base``. Collective under ZeRO-3: call on all ranks."""
    from .summary_files import summary_export_config, write_summary_adapter_files

    # The checks (and the base digest) on rank 0, their verdict on every rank, before the
    # collective gather: a refused export raises everywhere instead of leaving ranks waiting.
    saved, error = None, None
    if D.is_main():
        try:
            saved = summary_export_config(tokenizer, config, base_path)
        except ValueError as e:  # ModelLoadError (a base that is not a checkpoint) included
            error = str(e)
    errors = [e for e in D.all_gather_object(error) if e]
    if errors:
        raise ValueError(errors[0])
    state = _full_state_dict(adapter)
    path = None
    if D.is_main():
        with building_dir(out_dir) as tmp:
            write_summary_adapter_files(
                tmp,
                lm=lm,
                adapter=adapter,
                tokenizer=tokenizer,
                config=config,
                base_path=base_path,
                state=state,
                self_contained=self_contained,
                extra=extra,
                saved=saved,
            )
            add_embedder_files(tmp, name=out_dir)
            write_manifest(tmp)
        path = replace_dir_atomic(tmp, out_dir, overwrite=True)
    D.barrier()
    return path


def export_summary_adapter_state(
    state: dict[str, torch.Tensor],
    hf_config: dict,
    tokenizer,
    config,
    out_dir: str,
    extra: dict | None = None,
    *,
    base_path: str,
    self_contained: bool = False,
    overwrite: bool = True,
) -> str:
    """The same folder as export_summary_adapter from HF-named tensors ("model.layers.{i}.
    self_attn.q_proj.lora_A.weight" [r, in], "...lora_B.weight" [out, r]): megatron-core's
    adapter after mcore.summary.hf_adapter_state gathered and renamed it. ``hf_config``: the
    base's HF config (a skeleton of the model on the meta device names its linear layers for
    PEFT's target_modules). ``overwrite``: what to do with a non-empty ``out_dir``
    (common/outputs.py; train.py's own SAVE/hf: replace). Not collective: call on the rank
    holding ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..gem.adapter import SummaryAdapter
    from .summary_files import summary_export_config, write_summary_adapter_files

    names = sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    shapes = {n: (state[f"{n}.lora_A.weight"].shape[1], state[f"{n}.lora_B.weight"].shape[0]) for n in names}
    adapter = SummaryAdapter(shapes, rank=config.adapter_rank, alpha=config.adapter_alpha, positions=config.adapter_positions)
    with torch.no_grad():
        for n in names:
            adapter.delta_for(n).lora_A.copy_(state[f"{n}.lora_A.weight"])
            adapter.delta_for(n).lora_B.copy_(state[f"{n}.lora_B.weight"])
    cfg = dict(hf_config)
    kind = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(kind)
    saved = summary_export_config(tokenizer, config, base_path)
    with building_dir(out_dir) as tmp:
        write_summary_adapter_files(
            tmp, lm=skeleton, adapter=adapter, tokenizer=tokenizer, config=config, base_path=base_path, extra=extra, saved=saved, self_contained=self_contained
        )
        add_embedder_files(tmp, name=out_dir)
        write_manifest(tmp)
    return replace_dir_atomic(tmp, out_dir, overwrite=overwrite)
