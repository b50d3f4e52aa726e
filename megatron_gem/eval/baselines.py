"""Training-free embeddings from any HF causal LM: the baselines GEM must beat (docs/eval.md).

  mean       mean of the last-layer states of the text's tokens (BOS left out: it is the
             attention sink and its state does not depend on the text)
  last       last-layer state of the text's last token
  echo       Springer et al. 2024: the text is written twice
             ("Rewrite the sentence:\\n{x}\\nRewritten sentence:\\n{x}") and the states of the
             second copy are averaged, so every pooled token has seen the whole text
  prompteol  Jiang et al. 2023: 'This sentence : "{x}" means in one word:"' and the state of
             the final token (the model is about to name the meaning in one word)

Each ``*_encoder(model, tokenizer, **kw)`` returns a :class:`CausalLMEncoder`, a callable
``encode(list[str]) -> float32 tensor [n, hidden]`` (L2-normalised unless normalize=False).
Texts are cut to fit ``max_length`` tokens with the template; the template pieces and the
text are tokenised separately so both echo copies have identical tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

METHODS = ("mean", "last", "echo", "prompteol")

ECHO_TEMPLATE = ("Rewrite the sentence:\n", "\nRewritten sentence:\n")
PROMPTEOL_TEMPLATE = ('This sentence : "', '" means in one word:"')


class CausalLMEncoder:
    def __init__(
        self,
        model,
        tokenizer,
        method: str,
        *,
        max_length: int = 512,
        batch_size: int = 16,
        normalize: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        show_progress_bar: bool = False,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown pooling method {method!r}; choose one of {METHODS}")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.method = method
        self.max_length = max_length
        self.batch_size = batch_size
        self.normalize = normalize
        self.show_progress_bar = show_progress_bar
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        piece = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
        self._echo = [piece(s) for s in ECHO_TEMPLATE]
        self._eol = [piece(s) for s in PROMPTEOL_TEMPLATE]
        overhead = (self.bos is not None) + {"mean": 0, "last": 0, "echo": sum(map(len, self._echo)), "prompteol": sum(map(len, self._eol))}[method]
        need = overhead + (2 if method == "echo" else 1)
        if max_length < need:
            raise ValueError(f"max_length={max_length} leaves no room for text in the {method} template ({overhead} tokens)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def layout(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids, positions to pool) of one text under this method."""
        head = [self.bos] if self.bos is not None else []
        x = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not x:
            raise ValueError(f"text {text!r} tokenises to nothing; cannot embed an empty text")
        if self.method in ("mean", "last"):
            x = x[: self.max_length - len(head)]
            ids = head + x
            pool = list(range(len(head), len(ids))) if self.method == "mean" else [len(ids) - 1]
            return ids, pool
        if self.method == "echo":
            a, b = self._echo
            x = x[: (self.max_length - len(head) - len(a) - len(b)) // 2]
            ids = head + a + x + b + x
            return ids, list(range(len(ids) - len(x), len(ids)))
        a, b = self._eol
        x = x[: self.max_length - len(head) - len(a) - len(b)]
        ids = head + a + x + b
        return ids, [len(ids) - 1]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int | None = None, show_progress_bar: bool | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        batch_size = batch_size or self.batch_size
        rows = [self.layout(t) for t in texts]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = torch.empty(len(rows), self.model.config.hidden_size, dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        if self.show_progress_bar if show_progress_bar is None else show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"{self.method} encode", unit="batch")
        base = self.model.base_model
        for s in starts:
            idx = order[s : s + batch_size]
            width = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            pool = torch.zeros((len(idx), width), dtype=torch.float32)
            for r, i in enumerate(idx):
                tok, where = rows[i]
                ids[r, : len(tok)] = torch.tensor(tok)
                attn[r, : len(tok)] = 1
                pool[r, where] = 1.0 / len(where)
            hidden = base(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False).last_hidden_state
            emb = torch.einsum("bl,bld->bd", pool.to(self.device), hidden.float())
            if self.normalize:
                emb = F.normalize(emb, dim=-1)
            out[torch.tensor(idx)] = emb.cpu()
        return out

    __call__ = encode


def mean_pooling_encoder(model, tokenizer, **kw) -> CausalLMEncoder:
    return CausalLMEncoder(model, tokenizer, "mean", **kw)


def last_token_encoder(model, tokenizer, **kw) -> CausalLMEncoder:
    return CausalLMEncoder(model, tokenizer, "last", **kw)


def echo_encoder(model, tokenizer, **kw) -> CausalLMEncoder:
    return CausalLMEncoder(model, tokenizer, "echo", **kw)


def prompteol_encoder(model, tokenizer, **kw) -> CausalLMEncoder:
    return CausalLMEncoder(model, tokenizer, "prompteol", **kw)
