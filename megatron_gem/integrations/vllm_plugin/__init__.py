"""GEM embeddings in vLLM (docs/vllm.md): a vLLM general plugin, out of tree.

Installing megatron-gem in vLLM's environment registers it (pyproject.toml entry point group
``vllm.general_plugins``); vLLM then calls :func:`register` in each of its processes, which
adds (the model and renderer by module name: vLLM imports them where it needs them):

  GEMForEmbedding     a model architecture (model.py): vLLM's Llama as a pooling model, with a
                      summary-mode adapter's deltas at the summary token
  --tokenizer-mode gem   the GEM renderer (renderer.py): embed template + summary token
  config hooks        (config_hook.py) the engine settings a GEM model needs, or a refusal;
                      a GEM export served as a plain Llama pooling model is refused

A GEM folder is served with ``--runner pooling --hf-overrides '{"architectures":
["GEMForEmbedding"], ...}'``; ``python -m megatron_gem.integrations.vllm_plugin serve FOLDER``
(cli.py) checks the folder and runs ``vllm serve`` with those arguments. K = 1 only (folder.py
says why).
"""

from __future__ import annotations

from .folder import ARCHITECTURE, GEM_DIR_KEY, TOKENIZER_MODE

__all__ = ["ARCHITECTURE", "GEM_DIR_KEY", "TOKENIZER_MODE", "register"]


def register() -> None:
    """vLLM's plugin entry point; safe to call more than once (each process loads plugins)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from .config_hook import GEMConfigHook, PlainLlamaGuard

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:GEMForEmbedding")
    MODELS_CONFIG_MAP[ARCHITECTURE] = GEMConfigHook
    MODELS_CONFIG_MAP.setdefault("LlamaForCausalLM", PlainLlamaGuard)  # vLLM 0.32 holds none for it
    # The mode's tokenizer is vLLM's own HF one; only the renderer (text -> prompt ids) is ours.
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, f"{__name__}.renderer", "GEMRenderer")
