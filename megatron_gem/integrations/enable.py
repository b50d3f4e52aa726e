"""Add GEM to any HF causal LM in one call, and take it off again for export.

``enable_gem(model, tokenizer, config)``
  1. adds the K special tokens to the tokenizer and the model (``gem.tokens.add_gem_tokens``:
     mean-row init of the new input (and untied output) rows; idempotent, so a GEM checkpoint
     is left as is; under ZeRO-3 the rows are gathered, edited on rank 0 and re-partitioned);
  2. registers and selects the "gem" attention (``attention.hf.use_gem_attention``): forwards
     that carry ``doc_ids=`` and ``roles=`` run the GEM mask, forwards without them (e.g.
     ``generate()``) are plain causal attention, which is what GEM means for ordinary text;
  3. tells ``generate()`` never to emit the special tokens (``generation_config.suppress_tokens``):
     they are never next-token targets, but their LM-head rows start at the mean row.
  The model is then ready for batches with ``input_ids, labels, position_ids, doc_ids, roles``
  (what :class:`~megatron_gem.integrations.GEMDataCollator` produces).

Summary mode (``config.train_mode == "summary"``), as train.py's ``--gem-train summary``: no token
is added and nothing is resized (K existing unused tokens serve, ``gem.tokens.summary_token_ids``;
their ids go to ``config.special_token_ids``); every base parameter is frozen and the summary
adapter is attached and registered as ``model.gem_adapter`` (integrations/gem_adapter.py); nothing is
suppressed in ``generate()`` (generation is the base model's, unchanged). ``base_path``: the base
checkpoint directory the export names and digests (default: where the model was loaded from).

``disable_gem(model)`` is the inverse for export: back to "sdpa" (the attention an exported
GEM checkpoint loads with), KV cache on again, the GEM attention settings removed from the HF
config. The special tokens stay (they are part of the checkpoint; the embedder needs them). In
summary mode it also takes the adapter off (hooks removed, ``model.gem_adapter`` gone, each base
parameter's requires_grad as before): the model is the base model again. Save the adapter
first (``GEMTrainer.save_model`` or ``integrations.save_gem_adapter``).
"""

from __future__ import annotations

from ..attention.hf import ATTN_NAME
from ..gem.config import GEMConfig
from ..hf.model import prepare_gem_lm
from .gem_adapter import attach_gem_adapter, detach_gem_adapter

_CONFIG_KEYS = ("gem_attention_backend", "gem_suffix_sees_bos")


def _suppress(generation_config, token_ids: list[int], add: bool) -> None:
    if generation_config is None:
        return
    current = [t for t in (getattr(generation_config, "suppress_tokens", None) or []) if t not in token_ids]
    generation_config.suppress_tokens = (current + list(token_ids) if add else current) or None


def enable_gem(
    model,
    tokenizer,
    config: GEMConfig | None = None,
    *,
    backend: str = "auto",
    gather=None,
    suppress_in_generate: bool = True,
    base_path: str | None = None,
):
    """Make ``model`` (an HF causal LM) a GEM model; returns it (same object).

    ``config``: the GEM settings (default ``GEMConfig()``); its ``special_token_ids`` are filled
    in and it is kept as ``model.gem_config``. ``backend``: "auto" | "sdpa" | "flex" | "triton"
    (see ``megatron_gem.gem_attention``). ``gather``: ZeRO-3 gather factory for the token rows;
    found automatically when the parameters are ZeRO-3 partitioned. Turns the KV cache off in
    the model config (packed training needs it off); ``generate()`` still works (causal).
    Summary mode: see the module docstring (``base_path``, ``model.gem_adapter``).
    """
    config = config if config is not None else GEMConfig()
    ids = prepare_gem_lm(model, tokenizer, config, backend=backend, gather=gather)  # what train.py does too
    if config.summary_mode:
        attach_gem_adapter(model, tokenizer, config, base_path=base_path)
    elif suppress_in_generate:
        _suppress(getattr(model, "generation_config", None), ids, add=True)
    model.gem_config = config
    return model


def disable_gem(model, *, attn_implementation: str = "sdpa", use_cache: bool = True):
    """Undo the attention part of :func:`enable_gem` (for export or plain-LM use); returns the
    model. Keeps the special tokens and their suppression in ``generate()``. Summary mode: also
    detaches the adapter (see the module docstring)."""
    detach_gem_adapter(model)
    if getattr(model.config, "_attn_implementation", None) == ATTN_NAME or attn_implementation != "sdpa":
        model.set_attn_implementation(attn_implementation)
    for key in _CONFIG_KEYS:
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.config.use_cache = use_cache
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.use_cache = use_cache
    return model


def is_gem_enabled(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == ATTN_NAME
