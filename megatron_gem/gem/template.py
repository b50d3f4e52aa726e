"""The embedding template (GEMConfig.embed_template): the text wrapped as
``<prefix> text <suffix>`` before its K summary tokens, in phase-2 training views and at
embedding time alike, so the two agree (docs/method.md, "Embedding template").

The template is a string with one ``{text}`` (e.g. PromptEOL's ``This sentence : "{text}" means in
one word:"``), split there and its two sides tokenised once (no special tokens): every text gets
the same prefix and suffix ids whatever it holds. A leading BOS that the tokenizer put on the text
stays first (``BOS prefix text suffix``). Truncation cuts the text, never the template. The empty
template ("", the default) leaves the tokens as they are: ``fit`` is then ``tokens[:max_len]``.

The value ``"chat"`` (CHAT) is the tokenizer's own chat template: one user turn holding the text,
rendered up to the start of the assistant's answer (``apply_chat_template([{"role": "user",
"content": text}], add_generation_prompt=True)``). The rendered string already holds whatever the
chat template puts first (a BOS token, a default system prompt), so a BOS the tokenizer put on the
text is dropped: the wrapped ids are ``prefix text suffix``, the tokens a chat prompt of that one
message feeds the model. That makes the summary tokens read from a chat prefill (GEMEmbedder.
embed_from_cache, the server's ``return_embedding``) the embedding of the message itself.

Takes the tokenizer as an object (it only calls it): gem/ imports no framework.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PLACEHOLDER = "{text}"
CHAT = "chat"  # the tokenizer's chat template around one user message (see the module docstring)


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` is "", ``"chat"`` or holds exactly one ``{text}``."""
    if not isinstance(template, str):
        raise ValueError(f"embed template {template!r} must be a string")
    if template and template != CHAT and template.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"embed template {template!r} must contain {PLACEHOLDER} exactly once, be {CHAT!r} (the tokenizer's chat template) or be empty for none"
        )


def render_chat_template(tokenizer) -> str:
    """The tokenizer's chat template rendered around one user message, up to the start of the
    assistant turn, as a template string with one ``{text}`` where the message goes. Raises
    ValueError when the tokenizer has no chat template or the template does not render the
    message exactly once as it is."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"embed template {CHAT!r}: the tokenizer has no chat template (tokenizer_config.json chat_template / chat_template.jinja)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True, tokenize=False)
    if not isinstance(rendered, str) or rendered.count(PLACEHOLDER) != 1:
        raise ValueError(f"embed template {CHAT!r}: the tokenizer's chat template does not render the user message exactly once as written ({rendered!r})")
    return rendered


class EmbedTemplate:
    """Token ids around every embedded text. ``lead_id``: the BOS the tokenizer puts first (kept first)."""

    def __init__(
        self, template: str = "", prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (), lead_id: int | None = None, *, drop_lead: bool = False
    ):
        check_template(template)
        if not template and (len(prefix_ids) or len(suffix_ids)):
            raise ValueError("the empty template has no prefix or suffix ids")
        self.template = template
        self.prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
        self.suffix_ids = np.asarray(suffix_ids, dtype=np.int64)
        self.lead_id = lead_id
        # The chat template: the rendered prefix holds what comes first, so the text's BOS goes.
        self.drop_lead = drop_lead

    @classmethod
    def from_tokenizer(cls, template: str, tokenizer) -> "EmbedTemplate":
        check_template(template)
        if not template:
            return cls()
        chat = template == CHAT
        before, after = (render_chat_template(tokenizer) if chat else template).split(PLACEHOLDER)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        suffix = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        lead = int(bos) if bos is not None and probe and probe[0] == bos else None
        return cls(template, prefix, suffix, lead, drop_lead=chat)

    @property
    def extra(self) -> int:
        """Tokens the template adds to every text."""
        return int(self.prefix_ids.shape[0] + self.suffix_ids.shape[0])

    def text_budget(self, max_len: int) -> int:
        """How many text tokens (its BOS included) fit in ``max_len`` beside the template."""
        budget = int(max_len) - self.extra
        if budget < 1:
            raise ValueError(f"embed template {self.template!r} ({self.extra} tokens) leaves no room for text in {max_len} tokens")
        return budget

    def wrap(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[BOS] prefix text suffix`` of already truncated text tokens (int64)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if not self.template:
            return tokens
        if self.lead_id is not None and tokens.shape[0] and int(tokens[0]) == self.lead_id:
            lead = tokens[:0] if self.drop_lead else tokens[:1]
            return np.concatenate([lead, self.prefix_ids, tokens[1:], self.suffix_ids])
        return np.concatenate([self.prefix_ids, tokens, self.suffix_ids])

    def fit(self, tokens: Sequence[int] | np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
        """(wrapped tokens of at most ``max_len``, text tokens cut): the text is truncated, the template kept."""
        tokens = np.asarray(tokens, dtype=np.int64)
        text = tokens[: self.text_budget(max_len)]
        return self.wrap(text), int(tokens.shape[0] - text.shape[0])
