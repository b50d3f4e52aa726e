"""The trained module: an HF causal LM plus the learnable InfoNCE logit scale, its loading, and
making an HF causal LM a GEM model (train.py's DeepSpeed engine and integrations.enable_gem both
call ``prepare_gem_lm``)."""

from __future__ import annotations

import torch

from ..attention.hf import use_gem_attention
from ..common.errors import ModelLoadError, one_line
from ..gem.config import GEMConfig
from ..gem.losses import LogitScale, zero_touch
from ..gem.readout import pool_special_states
from ..gem.tokens import add_gem_tokens, find_gem_tokens, summary_token_ids
from .head_loss import LMHeadLosses


class GEMModel(torch.nn.Module):
    """What the engine optimises: ``lm`` (an HF causal LM), ``logit_scale`` and, in summary mode
    (``config.summary_mode``), ``adapter`` (gem/adapter.py's SummaryAdapter, hooked onto ``lm``
    by hf/summary.py; ``lm`` is then frozen and only the adapter and the logit scale train).

    ``forward(batch, "ntp_losses")`` -> per-token next-token cross-entropy [B, L] (fp32, 0 where
    ``batch["labels"]`` is ignored) through the LM head without full logits (hf/head_loss.py);
    ``forward(batch, "ntp")`` -> the logits [B, L, V] themselves (padding rows -inf; the
    reference, and what a user inspecting outputs sees); ``forward(batch, "embed")`` -> (summary
    embeddings [2N + M, H] of the batch's anchors, positives and M hard negatives, logit scale). Everything runs inside
    forward so engines that hook the root module (DeepSpeed ZeRO-3) see one forward per call.
    In summary mode "embed" takes the fast path (hf/summary.py summary_states: the text without
    autograd, then only the summary tokens with it); ``fast_summary=False`` (or
    ``embeddings(batch, fast=False)``) gives the full-row forward, its reference.

    ``adapter``: an existing SummaryAdapter to attach (e.g. loaded from an export); default a new
    one from ``config`` (rank, alpha, targets, positions; B = 0, so it starts as the base model).
    ``vocab_size``: the real vocabulary; LM-head rows at and beyond it are padding
    (gem.tokens.pad_vocab_rows) and never take part in a softmax. None: no padding.
    """

    def __init__(self, lm, config: GEMConfig, *, adapter=None, fast_summary: bool = True, vocab_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.summary_mode = config.summary_mode
        self.fast_summary = fast_summary
        self.vocab_size = vocab_size
        self.logit_scale = LogitScale.from_config(config)
        self.head_losses = LMHeadLosses(lm, vocab_limit=vocab_size)
        if self.summary_mode:
            from .summary import attach_summary_adapter

            self.adapter = attach_summary_adapter(lm, config, adapter=adapter)
        elif adapter is not None:
            raise ValueError("an adapter was given but GEMConfig.train_mode is 'full'; summary mode (--gem-train summary) uses adapters")

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Last-layer states [B, L, H] under the GEM mask of the batch."""
        return self.lm.base_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            doc_ids=batch["doc_ids"],
            roles=batch["roles"],
            use_cache=False,
        ).last_hidden_state

    def embeddings(self, batch: dict, *, fast: bool = True) -> torch.Tensor:
        """Summary embeddings [num_docs, H] (not normalised) of a contrastive batch; summary mode
        with ``fast``: summary_states (no autograd through the text), else the full-row forward."""
        num_docs = 2 * int(batch["num_texts"]) + int(batch.get("num_negatives", 0))  # anchors, positives, hard negatives
        if self.summary_mode and fast:
            from .summary import summary_states

            states, q = summary_states(self.lm, self.adapter, batch)
            return pool_special_states(states, q["roles"], q["doc_ids"], num_docs)
        return pool_special_states(self.hidden_states(batch), batch["roles"], batch["doc_ids"], num_docs)

    def forward(self, batch: dict, task: str = "ntp"):
        # Every trainable parameter takes part in every forward (gem.losses.zero_touch says why):
        # the LM head in the contrastive phase, the logit scale in phase 1. In summary mode the LM
        # is frozen (nothing to touch there) and the deltas act in every forward whose batch has
        # a summary token; one that has none touches them explicitly.
        if task not in ("ntp", "ntp_losses", "embed"):
            raise ValueError(f"unknown task {task!r}; expected 'ntp_losses', 'ntp' or 'embed'")
        scale = self.logit_scale()
        if task == "embed":
            if self.summary_mode:
                emb = self.embeddings(batch, fast=self.fast_summary)
                return emb + self._untouched_adapter(batch, emb).to(emb.dtype), scale
            hidden = self.hidden_states(batch)
            docs = 2 * int(batch["num_texts"]) + int(batch.get("num_negatives", 0))  # anchors, positives, hard negatives
            emb = pool_special_states(hidden, batch["roles"], batch["doc_ids"], docs)
            head = self.lm.get_output_embeddings()
            return emb + zero_touch(head(hidden[:1, :1])).to(emb.dtype), scale  # the head through its own forward (ZeRO-3 gathers it)
        hidden = self.hidden_states(batch)
        touch = zero_touch(scale, self._untouched_adapter(batch, hidden) if self.summary_mode else None)
        if task == "ntp_losses":
            return self.head_losses(hidden, batch["labels"]) + touch
        logits = self.lm.get_output_embeddings()(hidden + touch.to(hidden.dtype))  # touched on [B, L, H], not on the larger logits
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= self.vocab_size, float("-inf"))
        return logits

    def _untouched_adapter(self, batch: dict, like: torch.Tensor) -> torch.Tensor:
        """Summary mode: a 0 that runs through every delta when ``batch`` activates them nowhere
        (else a plain 0)."""
        from .summary import adapter_acts_on, touch_adapter

        return like.new_zeros((), dtype=torch.float32) if adapter_acts_on(self.adapter, batch) else zero_touch(touch_adapter(self.adapter, like))


def ensure_pad_token(tokenizer):
    """Batches are padded with pad_token_id; padding is masked and never trained, so any id
    will do: the EOS token when the tokenizer has none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str, flag: str = "--tokenizer"):
    """The tokenizer of ``path`` with a pad token; a folder whose tokenizer files cannot be read
    raises ModelLoadError naming ``flag`` (check_model_source has checked that they exist)."""
    from transformers import AutoTokenizer

    try:
        return ensure_pad_token(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        # transformers reports a truncated tokenizer.json, a missing sentencepiece model or a
        # wrong tokenizer class through any of these
        raise ModelLoadError(f"{flag} {path}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})") from e


def check_gem_tokens(tokenizer, config: GEMConfig) -> None:
    """Raise ModelLoadError, before any model loads, when ``tokenizer`` cannot give the GEM
    tokens ``config`` asks for: summary mode's K existing unused tokens (or the named ones), or
    full mode's new names clashing with ordinary tokens. ``config`` is left as it is."""
    import copy

    try:
        if config.summary_mode:
            summary_token_ids(tokenizer, copy.deepcopy(config))
        else:
            find_gem_tokens(tokenizer, config)
    except ValueError as e:
        raise ModelLoadError(one_line(e)) from e


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


def zero3_gather(model):
    """The ``gather`` argument of add_gem_tokens: a GatheredParameters factory when ``model``'s
    parameters are ZeRO-3 partitioned (loaded under deepspeed.zero.Init), else None."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return None
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def prepare_gem_lm(lm, tokenizer, config: GEMConfig, *, backend: str = "auto", gradient_checkpointing: bool = False, gather=None) -> list[int]:
    """Make ``lm`` a GEM model in place: a pad token for the tokenizer, the K special tokens
    (mean-row init; a no-op for a GEM checkpoint; ZeRO-3 partitions gathered, see zero3_gather;
    summary mode: K existing tokens, see gem.tokens.summary_token_ids, nothing resized),
    GEM attention with the KV cache off, optionally activation recomputation. Returns the
    special-token ids."""
    ensure_pad_token(tokenizer)
    if config.summary_mode:
        # Summary mode adds no token and resizes nothing: K existing tokens serve (their rows
        # stay frozen with the rest of the base model); GEMModel attaches the adapter.
        ids = summary_token_ids(tokenizer, config)
    else:
        ids = add_gem_tokens(lm, tokenizer, config, gather=gather if gather is not None else zero3_gather(lm))
    use_gem_attention(lm, backend=backend, suffix_sees_bos=config.suffix_sees_bos)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ids


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' scale-like 1-D params and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params are flat; ds_shape is the real one
        (no_decay if ndim < 2 or name.startswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
