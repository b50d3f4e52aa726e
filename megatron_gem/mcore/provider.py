"""Building this rank's megatron-core GEM model with weights: train.py's megatron engine and the
Megatron-LM integration's model provider both call ``build_gem_model``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.errors import ModelLoadError
from ..gem.config import GEMConfig
from ..gem.tokens import find_gem_tokens, summary_token_ids
from . import checkpoint_io as io
from .fused import LayerImpl, choose_layer_impl, fused_kernels_available
from .hf_mapping import load_hf_into_model
from .hf_source import check_summary_ids_fit, load_hf_source
from .llama import LlamaArch, build_gem_gpt_model, padded_vocab_size, transformer_config


@dataclass
class BuiltModel:
    model: torch.nn.Module  # this pipeline stage's GEMGPTModel, weights loaded
    arch: LlamaArch
    config: object  # megatron-core TransformerConfig
    meta: dict  # megatron_gem.json content of a checkpoint of this model (export needs it)
    layer_impl: LayerImpl  # the layer implementation chosen from the fused kernels here (mcore/fused.py)


def build_gem_model(
    path: str,
    tokenizer,
    gem_config: GEMConfig,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    seq_length: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seed: int = 0,
) -> BuiltModel:
    """``path``: an HF checkpoint (GEM tokens added with mean rows when missing; each rank reads
    only its stage's tensors) or a megatron checkpoint from tools/convert_checkpoint.py (its GEM
    tokens must be in ``tokenizer``). megatron-core's parallel state must be initialised.
    The layers are the TransformerEngine spec, apex's fused RMSNorm or the local spec, whichever
    this machine has (mcore.fused.choose_layer_impl; ``BuiltModel.layer_impl`` says which).
    Summary mode (``gem_config.train_mode == "summary"``): the summary tokens are existing ones
    (gem.tokens.summary_token_ids, no rows added), the base is frozen and the adapter attached
    (mcore.summary.attach_summary_adapter; its initial A from ``seed``).
    ``seq_length``: the longest row the run will feed, checked against the checkpoint's positions.
    Raises ModelLoadError / ValueError naming the problem."""
    from megatron.core import parallel_state

    if gem_config.summary_mode and sequence_parallel:
        raise ValueError("--gem-train summary does not support --sequence-parallel (the deltas act on whole-sequence layer inputs); drop one of the two flags")
    if io.is_megatron_checkpoint(path):
        meta = io.read_meta(path)
        arch = LlamaArch.from_dict(meta["arch"])
        vocab, padded = meta["vocab_size"], meta["padded_vocab_size"]
        if padded % tp:
            raise ModelLoadError(f"--model {path}: padded vocabulary {padded} is not divisible by TP={tp}; re-convert with --tensor-model-parallel-size {tp}")
        ids = summary_token_ids(tokenizer, gem_config) if gem_config.summary_mode else find_gem_tokens(tokenizer, gem_config)
        if gem_config.summary_mode:
            check_summary_ids_fit(path, ids, vocab)
        elif ids is None:
            raise ModelLoadError(
                f"--model {path}: the checkpoint has no GEM tokens; add them to the HF checkpoint with tools/add_gem_tokens.py before converting"
            )
        gem_config.special_token_ids = ids
        source, hf_config = None, meta["hf_config"]
    else:
        arch, hf_config, source, vocab = load_hf_source(path, tokenizer, gem_config)
        padded = padded_vocab_size(vocab, tp, make_vocab_size_divisible_by)
    if seq_length is not None and seq_length > arch.max_position_embeddings:
        # train.py checks this in its flags; the Megatron-LM provider's callers reach it here.
        raise ModelLoadError(f"--seq-length {seq_length} is above --model {path}'s max_position_embeddings {arch.max_position_embeddings}")
    impl = choose_layer_impl(fused_kernels_available(), summary_mode=gem_config.summary_mode)
    config = transformer_config(
        arch,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        params_dtype=dtype,
        layer_impl=impl.name,
    )
    model = build_gem_gpt_model(
        arch,
        config,
        vocab_size=vocab,
        padded_vocab=padded,
        backend=backend,
        suffix_sees_bos=gem_config.suffix_sees_bos,
        logit_scale_init=gem_config.logit_scale_init,
        logit_scale_max=gem_config.logit_scale_max,
        pre_process=pre_process,
        post_process=post_process,
        layer_impl=impl.name,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if source is not None:
        load_hf_into_model(model, source, arch, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp)
    else:
        io.load_model(model, path)
    if gem_config.summary_mode:
        from .summary import attach_summary_adapter

        attach_summary_adapter(model, gem_config, seed=seed)
    meta = io.make_meta(arch, vocab_size=vocab, padded_vocab=padded, tp=tp, pp=pp, hf_config=hf_config, divisible_by=make_vocab_size_divisible_by)
    meta["dtype"] = str(dtype).replace("torch.", "")
    return BuiltModel(model, arch, config, meta, impl)
