"""The trained module: an HF causal LM plus the learnable InfoNCE logit scale, and its loading."""

from __future__ import annotations

import torch

from ..attention.hf import use_gem_attention
from ..gem.config import GEMConfig
from ..gem.losses import LogitScale
from ..gem.readout import pool_special_states
from ..gem.tokens import add_gem_tokens


class GEMModel(torch.nn.Module):
    """What the engine optimises: ``lm`` (an HF causal LM) and ``logit_scale``.

    ``forward(batch, "ntp")`` -> logits [B, L, V]; ``forward(batch, "embed")`` -> (summary
    embeddings [num_docs, H] of the batch's documents, logit scale). Everything runs inside
    forward so engines that hook the root module (DeepSpeed ZeRO-3) see one forward per call.
    """

    def __init__(self, lm, config: GEMConfig):
        super().__init__()
        self.lm = lm
        self.logit_scale = LogitScale.from_config(config)

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Last-layer states [B, L, H] under the GEM mask of the batch."""
        return self.lm.base_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            doc_ids=batch["doc_ids"],
            roles=batch["roles"],
            use_cache=False,
        ).last_hidden_state

    def forward(self, batch: dict, task: str = "ntp"):
        # Every parameter takes part in every forward (the unused one times zero): ZeRO-3
        # otherwise keeps a stale gradient for a parameter a step did not use (the LM head in
        # the contrastive phase), which leaks into the grad norm and the update and breaks
        # exact resume; DDP-style engines need no unused-parameter search either.
        hidden = self.hidden_states(batch)
        head = self.lm.get_output_embeddings()
        scale = self.logit_scale()
        if task == "ntp":
            return head(hidden + 0.0 * scale)  # touched on [B, L, H], not on the larger logits
        if task == "embed":
            emb = pool_special_states(hidden, batch["roles"], batch["doc_ids"], 2 * int(batch["num_texts"]))
            return emb + 0.0 * head(hidden[:1, :1]).sum(), scale
        raise ValueError(f"unknown task {task!r}; expected 'ntp' or 'embed'")


class ModelLoadError(ValueError):
    pass


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked and never trained; any id will do
    return tok


def load_causal_lm(path: str, *, dtype: torch.dtype, ds_config: dict | None = None):
    """Load an HF causal LM. With a ZeRO-3 ``ds_config`` the weights are created partitioned
    (transformers runs from_pretrained under deepspeed.zero.Init while an HfDeepSpeedConfig is
    alive; the returned handle must be kept alive as long as the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {path}: cannot read an HF config ({e})") from e
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelLoadError(f"--model {path}: architecture {archs} has no causal LM head; GEM needs a decoder-only causal LM")
    keep_alive = None
    if ds_config is not None and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as e:
        raise ModelLoadError(f"--model {path}: not loadable as a causal LM ({e})") from e
    return lm, keep_alive


def zero3_gather(ds_config: dict | None):
    """The ``gather`` argument of add_gem_tokens for this engine (None when not ZeRO-3)."""
    if ds_config is None or int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def prepare_gem_lm(lm, tokenizer, config: GEMConfig, *, backend: str, gradient_checkpointing: bool, gather=None):
    """Add the GEM tokens (mean-row init; no-op for an extended checkpoint), switch to GEM
    attention with the KV cache off, and optionally turn on activation recomputation."""
    add_gem_tokens(lm, tokenizer, config, gather=gather)
    use_gem_attention(lm, backend=backend, suffix_sees_bos=config.suffix_sees_bos)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' scale-like 1-D params and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params are flat; ds_shape is the real one
        (no_decay if ndim < 2 or name.startswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
