"""``GEMForEmbedding``: vLLM's Llama as a pooling model that gives GEM embeddings.

The prompt arrives as the GEM layout (renderer.py: ``[BOS] prefix text suffix SUMMARY``). With
K = 1 the GEM mask of that layout is the causal mask (no suffix, no second summary token), so
vLLM's own attention runs it; the embedding is the last token's final state, L2-normalised
(``embed`` is the only pooling task offered).

Summary mode: the base checkpoint's weights, and the adapter folder's low-rank deltas
``x A^T B^T * alpha / r`` added to the adapted linear layers' outputs at the summary positions
only (the last token of each prompt: config_hook.py makes every prompt run whole, from position
0). They are read from the folder's PEFT files (hf/summary_files.py: the guard and the base's
digest) and hooked onto vLLM's fused layers: q/k/v go to their slices of ``qkv_proj``,
gate/up to theirs of ``gate_up_proj``. Every other token runs through the base model exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.layers.pooler.seqwise.poolers import pooler_for_embed
from vllm.model_executor.models.adapters import as_embedding_model
from vllm.model_executor.models.llama import LlamaForCausalLM

from ...hf.summary_files import read_summary_adapter
from .deltas import SummaryDeltas, summary_rows
from .folder import TOKENIZER_MODE, GEMFolder, folder_of

_EmbeddingLlama = as_embedding_model(LlamaForCausalLM)


def _check_engine(vllm_config: VllmConfig, gem: GEMFolder) -> None:
    """What config_hook.py set, checked where it matters (a config built without the hook)."""
    if vllm_config.model_config.tokenizer_mode != TOKENIZER_MODE:
        raise ValueError(f"GEMForEmbedding needs --tokenizer-mode {TOKENIZER_MODE} (the GEM layout), got {vllm_config.model_config.tokenizer_mode!r}")
    if gem.adapter_dir is not None and (vllm_config.scheduler_config.enable_chunked_prefill or vllm_config.cache_config.enable_prefix_caching):
        raise ValueError("a GEM summary-mode adapter needs each prompt computed whole: --no-enable-chunked-prefill --no-enable-prefix-caching")


class GEMForEmbedding(_EmbeddingLlama):
    """vLLM's Llama giving GEM embeddings of a full-mode export or, with a summary-mode adapter
    folder (``gem_dir``), of the base model with the folder's deltas at the summary token."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        gem = folder_of(vllm_config.model_config)  # refuses what the plugin cannot serve, before building the model
        _check_engine(vllm_config, gem)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.gem: GEMFolder = gem
        self.summary_deltas: SummaryDeltas | None = None

    def _init_pooler(self, vllm_config: VllmConfig, prefix: str = ""):
        return DispatchPooler({"embed": pooler_for_embed(vllm_config.model_config.pooler_config)})

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        loaded = super().load_weights(weights)
        if self.gem.adapter_dir is not None:
            # The guard and the base's digest (hashes the weight files once, in the worker).
            folder = read_summary_adapter(self.gem.adapter_dir, base=self.gem.model_dir)
            scaling = folder.config.adapter_alpha / folder.config.adapter_rank
            self.summary_deltas = SummaryDeltas(self, folder.state, scaling, self.packed_modules_mapping, self.gem.adapter_dir)
        return loaded

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.summary_deltas is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        if input_ids is None:
            raise ValueError("a GEM summary-mode adapter needs token ids (prompt embeddings are not supported)")
        self.summary_deltas.rows = summary_rows(input_ids, positions, self.gem.summary_id)
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            self.summary_deltas.rows = None
