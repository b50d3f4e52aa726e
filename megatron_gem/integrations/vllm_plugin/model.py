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
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.layers.pooler.seqwise.poolers import pooler_for_embed
from vllm.model_executor.models.adapters import as_embedding_model
from vllm.model_executor.models.llama import LlamaForCausalLM

from ...common.errors import ModelLoadError
from ...hf.summary_files import PEFT_PREFIX, read_summary_adapter
from .folder import TOKENIZER_MODE, GEMFolder, folder_of

_EmbeddingLlama = as_embedding_model(LlamaForCausalLM)


def summary_rows(input_ids: torch.Tensor, positions: torch.Tensor, summary_id: int) -> torch.Tensor:
    """Indices [n] of the flattened batch's summary tokens: the last token of each prompt (the
    next token starts another prompt at position 0, or there is none) that is the summary token."""
    last = torch.ones_like(positions, dtype=torch.bool)
    last[:-1] = positions[1:] == 0
    return torch.nonzero(last & (input_ids == summary_id)).flatten()


class SummaryDeltas(nn.Module):
    """The adapter's deltas on a vLLM model's linear layers, added at ``rows`` (set per forward).

    ``slices[module name]``: (first, end) output columns and the delta's ``lora_A`` [r, in] /
    ``lora_B`` [end - first, r], as buffers (not parameters: vLLM's loader fills parameters from
    the base checkpoint and checks that each one was)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], scaling: float, packed: dict[str, list[str]], source: str):
        super().__init__()
        self.scaling = scaling
        self.rows: torch.Tensor | None = None
        modules = dict(model.named_modules())
        fused = {part: (name, i) for name, parts in packed.items() for i, part in enumerate(parts)}
        self.slices: dict[str, list[tuple[int, int, str, str]]] = {}
        names = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in state})
        for n, hf_name in enumerate(names):
            parent, leaf = hf_name.rsplit(".", 1)
            target, shard = fused.get(leaf, (leaf, 0))
            module_name = f"{parent}.{target}"
            module = modules.get(module_name)
            if module is None or not hasattr(module, "output_partition_sizes"):
                raise ModelLoadError(f"{source}: adapter layer {hf_name} has no linear layer {module_name} in vLLM's model")
            sizes = list(module.output_partition_sizes)
            first = sum(sizes[:shard])
            a, b = state[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"], state[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"]
            if a.shape[1] != module.input_size_per_partition or b.shape[0] != sizes[shard] or a.shape[0] != b.shape[1]:
                raise ModelLoadError(
                    f"{source}: adapter layer {hf_name} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) does not fit {module_name} "
                    f"(input {module.input_size_per_partition}, output slice {sizes[shard]})"
                )
            weight = next(module.parameters())
            self.register_buffer(f"a{n}", a.to(weight.device, weight.dtype), persistent=False)
            self.register_buffer(f"b{n}", b.to(weight.device, weight.dtype), persistent=False)
            self.slices.setdefault(module_name, []).append((first, first + sizes[shard], f"a{n}", f"b{n}"))
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.slices]

    def _hook(self, name: str):
        def add_deltas(module, args, output):
            rows = self.rows
            if rows is None or rows.numel() == 0:
                return output
            out = output[0] if isinstance(output, tuple) else output
            x = args[0].index_select(0, rows)
            for first, end, a, b in self.slices[name]:
                out[rows, first:end] += (x @ getattr(self, a).t()) @ getattr(self, b).t() * self.scaling
            return output

        return add_deltas


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
