"""The engine settings a GEM model needs, set (or refused) when vLLM builds its config: vLLM
calls ``verify_and_update_model_config`` / ``verify_and_update_config`` of the class that
``MODELS_CONFIG_MAP`` holds for the served architecture (``register`` puts this one there).

Every mode: the GEM renderer (``--tokenizer-mode gem``: the embed template and the appended
summary token; without it vLLM would embed the bare text), last-token pooling (the K = 1
readout), no chunked processing of long inputs (it would embed pieces without their summary
token) and no Matryoshka dimensions (GEM trains none).

Summary mode also needs the deltas' rows to be known inside the forward: the last token of
each prompt, found from the positions (a prompt starts at position 0). That holds when every
prompt is computed in one piece from position 0: no chunked prefill and no prefix caching
(a cached block ending with a summary token would also carry the deltas' keys into another
prompt). The deltas are forward hooks on the linear layers, run eagerly (no torch.compile
graph), on one tensor- and pipeline-parallel rank.

``PlainLlamaGuard`` (held for LlamaForCausalLM): a GEM export served as a plain Llama under
``--runner pooling`` would embed the bare text (no template, no summary token) and give other
vectors without a word: refused, naming the command that serves it.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ...gem.config import CONFIG_NAME
from .folder import TOKENIZER_MODE, folder_of

# Under "vllm." so that vLLM's logging configuration prints it with its own lines.
logger = init_logger("vllm.plugins.megatron_gem")


class GEMConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        folder = folder_of(model_config)  # raises for what the plugin cannot serve
        if model_config.runner_type != "pooling":
            raise ValueError(
                f"GEMForEmbedding serves embeddings: run it with --runner pooling. A GEM model generates as its HF checkpoint does: serve "
                f"{folder.model_dir} without the GEMForEmbedding override (docs/vllm.md)"
            )
        if model_config.tokenizer_mode in ("auto", "hf"):
            model_config.tokenizer_mode = TOKENIZER_MODE
        elif model_config.tokenizer_mode != TOKENIZER_MODE:
            raise ValueError(f"--tokenizer-mode {model_config.tokenizer_mode}: a GEM model is served with --tokenizer-mode {TOKENIZER_MODE} (the default here)")
        pooler = model_config.pooler_config
        sources = getattr(model_config, "_pooler_config_sources", {})
        if pooler.seq_pooling_type != "LAST":
            if sources.get("seq_pooling_type") == "user":
                raise ValueError(f"--pooler-config seq_pooling_type={pooler.seq_pooling_type}: a GEM embedding is the state of its last (summary) token: LAST")
            pooler.seq_pooling_type = "LAST"
        if pooler.enable_chunked_processing:
            raise ValueError("--pooler-config enable_chunked_processing: a GEM embedding needs the whole text before its summary token; leave it off")
        if pooler.dimensions is not None:
            raise ValueError(f"--pooler-config dimensions={pooler.dimensions}: GEM models are not trained for Matryoshka dimensions")

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        if folder_of(model_config).adapter_dir is None:
            return
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={parallel.tensor_parallel_size} pipeline_parallel_size={parallel.pipeline_parallel_size}: "
                f"the GEM plugin applies summary-mode adapters on one rank; serve with --tensor-parallel-size 1 --pipeline-parallel-size 1"
            )
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        if scheduler.enable_chunked_prefill or cache.enable_prefix_caching:
            logger.info("GEM summary-mode adapter: chunked prefill and prefix caching off (each prompt runs whole, from position 0)")
        scheduler.enable_chunked_prefill = False
        scheduler.long_prefill_token_threshold = 0
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, model_config.max_model_len)
        cache.enable_prefix_caching = False
        from vllm.config import CompilationMode

        vllm_config.compilation_config.mode = CompilationMode.NONE


class PlainLlamaGuard(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        path = str(model_config.model)
        if model_config.runner_type == "pooling" and os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(
                f"{path} is a GEM export: as a plain LlamaForCausalLM pooling model it would embed the bare text, not GEM's layout. Serve it with "
                f"`python -m megatron_gem.integrations.vllm_plugin serve {path}` (the GEMForEmbedding architecture; docs/vllm.md)"
            )
