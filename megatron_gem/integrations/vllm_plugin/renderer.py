"""The prompts a GEM model embeds, built where vLLM turns request inputs into token ids (its
renderer, selected by ``--tokenizer-mode gem``): what GEMEmbedder embeds, token for token.

  text        ``tokenizer(text)`` (BOS as the request's ``add_special_tokens``, default on),
              wrapped in gem_config.json's embed template (gem/template.py: ``[BOS] prefix
              text suffix``), then the summary token: GEMEmbedder.encode's layout.
  token ids   taken as the text's tokens, the summary token appended (no template):
              GEMEmbedder.encode_token_ids's layout.

Lengths follow vLLM's rules, with GEM's truncation: without ``truncate_prompt_tokens`` a prompt
over the model length is refused (400, vLLM's message); with it (N, or -1 for the model
length) the text is cut so that the wrapped text and the summary token fit in N, the template
never cut (a token-id input loses its end). Refused with a 400 naming the field: chat-style
``messages`` (the embed template is the model's wrapping; send the text as ``input``),
prompt embeddings, ``padding`` (pad tokens would follow the summary token) and
``truncation_side="left"``.
"""

from __future__ import annotations

from typing import Any, Sequence

from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.renderers.hf import HfRenderer
from vllm.utils.async_utils import make_async

from ...gem.template import EmbedTemplate
from .folder import folder_of

# Keys of a prompt that describe its text (replaced by the layout's ids); the rest travel along.
_TEXT_KEYS = ("prompt", "prompt_token_ids", "prompt_token_offsets")


class GEMRenderer(HfRenderer):
    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        folder = folder_of(config.model_config)
        gem = folder.config
        if self.tokenizer is None:
            raise ValueError("the GEM renderer tokenizes texts itself: start vLLM without --skip-tokenizer-init")
        name = (gem.summary_tokens or gem.special_tokens)[0]
        got = self.tokenizer.get_vocab().get(name)
        if got != folder.summary_id:
            raise ValueError(f"{folder.gem_dir}: the tokenizer maps the summary token {name!r} to {got}, gem_config.json says {folder.summary_id}")
        self.summary_ids = [folder.summary_id]
        self.template = EmbedTemplate.from_tokenizer(gem.embed_template, self.tokenizer)
        self._layouts_async = make_async(self._layouts, executor=self._executor)

    # ---- the GEM layout of one prompt ----

    def _limit(self, params) -> int | None:
        """The most tokens a prompt may have after truncation (None: no truncation asked)."""
        if params.pad_prompt_tokens is not None:
            raise VLLMValidationError("padding: pad tokens would follow the GEM summary token; leave padding unset", parameter="padding")
        limit = params.truncate_prompt_tokens
        if limit is None:
            return None
        if params.truncation_side == "left":
            raise VLLMValidationError(
                "truncation_side='left': a GEM model keeps the start of a text (its embed template wraps it); use 'right'", parameter="truncation_side"
            )
        return params.max_truncation_tokens if limit < 0 else limit

    def _layout(self, prompt: Any, params) -> TokensPrompt:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict) or "prompt_embeds" in prompt or "encoder_prompt" in prompt or prompt.get("multi_modal_data"):
            raise VLLMValidationError("a GEM model embeds text or token ids (prompt embeddings and multimodal inputs are not supported)", parameter="input")
        limit = self._limit(params)
        k = len(self.summary_ids)
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            if limit is not None:
                ids = ids[: max(limit - k, 0)]
        else:
            prompt = params.apply_pre_tokenization(self.tokenizer, dict(prompt))  # vLLM's length guard on the characters
            tokens = self.tokenizer(prompt["prompt"], add_special_tokens=params.add_special_tokens)["input_ids"]
            if limit is None:
                ids = self.template.wrap(tokens).tolist()
            else:
                try:
                    ids = self.template.fit(tokens, limit - k)[0].tolist()
                except ValueError as e:  # the template leaves no room for text in the limit
                    raise VLLMValidationError(f"truncate_prompt_tokens={params.truncate_prompt_tokens}: {e}", parameter="truncate_prompt_tokens") from None
        if not ids:
            raise VLLMValidationError("an input has no tokens; cannot embed an empty text", parameter="input")
        out = TokensPrompt(prompt_token_ids=ids + self.summary_ids)
        out.update({key: value for key, value in prompt.items() if key not in _TEXT_KEYS})
        if isinstance(prompt.get("prompt"), str):
            out["prompt"] = prompt["prompt"]
        return out

    def _layouts(self, prompts: Sequence[Any], params) -> list[TokensPrompt]:
        return [self._layout(p, params) for p in prompts]

    # ---- vLLM's entry points for completion-style inputs (what /v1/embeddings' `input` takes) ----

    def render_cmpl(self, prompts, tok_params=None, **kwargs):
        params = tok_params or self.default_cmpl_tok_params
        return super().render_cmpl(self._layouts(self.render_prompts(prompts), params), params, **kwargs)

    async def render_cmpl_async(self, prompts, tok_params=None, **kwargs):
        params = tok_params or self.default_cmpl_tok_params
        layouts = await self._layouts_async(await self.render_prompts_async(prompts), params)
        return await super().render_cmpl_async(layouts, params, **kwargs)

    # ---- chat-style inputs: refused ----

    def _refuse_chat(self):
        raise VLLMValidationError(
            "chat-style inputs (messages): a GEM model wraps the text in its own embed template (gem_config.json); send the text as `input`",
            parameter="messages",
        )

    def render_chat(self, *args, **kwargs):
        self._refuse_chat()

    async def render_chat_async(self, *args, **kwargs):
        self._refuse_chat()

    def warmup(self, chat_params) -> None:
        """No chat template to warm up (chat-style inputs are refused); the rest as vLLM's."""
        self.warmup_mm()
