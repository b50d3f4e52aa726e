"""The embedding template (GEMConfig.embed_template): the text wrapped as
``<prefix> text <suffix>`` before its K summary tokens, in phase-2 training views and at
embedding time alike, so the two agree (docs/method.md, "Embedding template").

The template is a string with one ``{text}`` (e.g. PromptEOL's ``This sentence : "{text}" means in
one word:"``), split there and its two sides tokenised once (no special tokens): every text gets
the same prefix and suffix ids whatever it holds. A leading BOS that the tokenizer put on the text
stays first (``BOS prefix text suffix``). Truncation cuts the text, never the template. The empty
template ("", the default) leaves the tokens as they are: ``fit`` is then ``tokens[:max_len]``.

Takes the tokenizer as an object (it only calls it): gem/ imports no framework.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PLACEHOLDER = "{text}"


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` is "" or holds exactly one ``{text}``."""
    if not isinstance(template, str):
        raise ValueError(f"embed template {template!r} must be a string")
    if template and template.count(PLACEHOLDER) != 1:
        raise ValueError(f"embed template {template!r} must contain {PLACEHOLDER} exactly once (or be empty for none)")


class EmbedTemplate:
    """Token ids around every embedded text. ``lead_id``: the BOS the tokenizer puts first (kept first)."""

    def __init__(self, template: str = "", prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (), lead_id: int | None = None):
        check_template(template)
        if not template and (len(prefix_ids) or len(suffix_ids)):
            raise ValueError("the empty template has no prefix or suffix ids")
        self.template = template
        self.prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
        self.suffix_ids = np.asarray(suffix_ids, dtype=np.int64)
        self.lead_id = lead_id

    @classmethod
    def from_tokenizer(cls, template: str, tokenizer) -> "EmbedTemplate":
        check_template(template)
        if not template:
            return cls()
        before, after = template.split(PLACEHOLDER)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        suffix = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        lead = int(bos) if bos is not None and probe and probe[0] == bos else None
        return cls(template, prefix, suffix, lead)

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
            return np.concatenate([tokens[:1], self.prefix_ids, tokens[1:], self.suffix_ids])
        return np.concatenate([self.prefix_ids, tokens, self.suffix_ids])

    def fit(self, tokens: Sequence[int] | np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
        """(wrapped tokens of at most ``max_len``, text tokens cut): the text is truncated, the template kept."""
        tokens = np.asarray(tokens, dtype=np.int64)
        text = tokens[: self.text_budget(max_len)]
        return self.wrap(text), int(tokens.shape[0] - text.shape[0])
