"""Text -> tokens: batch tokenisation, in worker processes for large inputs."""

from __future__ import annotations

import multiprocessing as mp
from typing import Iterable, Iterator, Sequence

import numpy as np


def eod_token_id(tokenizer) -> int:
    eod = tokenizer.eos_token_id
    if eod is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; cannot append an end-of-document token")
    return int(eod)


def tokenize_texts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True, append_eod: bool = False) -> list[np.ndarray]:
    """Tokenise a batch of texts (one fast-tokenizer call). Returns int64 arrays.

    ``add_special_tokens`` lets the tokenizer add what it adds by default (e.g. Llama's BOS);
    ``append_eod`` appends ``tokenizer.eos_token_id`` to every document (Megatron's --append-eod).
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)["input_ids"]
    out = [np.asarray(x, dtype=np.int64) for x in ids]
    if append_eod:
        eod = np.array([eod_token_id(tokenizer)], dtype=np.int64)
        out = [np.concatenate([x, eod]) for x in out]
    return out


_WORKER_TOKENIZER = None
_WORKER_KW: dict = {}


def _worker_init(tokenizer, kw) -> None:
    global _WORKER_TOKENIZER, _WORKER_KW
    _WORKER_TOKENIZER, _WORKER_KW = tokenizer, kw


def _worker_tokenize(texts: list[str]) -> list[np.ndarray]:
    return tokenize_texts(_WORKER_TOKENIZER, texts, **_WORKER_KW)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_stream(
    texts: Iterable[str],
    tokenizer,
    *,
    batch_size: int = 512,
    num_proc: int = 1,
    add_special_tokens: bool = True,
    append_eod: bool = False,
) -> Iterator[np.ndarray]:
    """Tokenise a stream of texts in order, in batches, optionally in ``num_proc`` processes.

    Reading stays in the calling process (so errors name their line in order); workers only
    tokenise. Output order equals input order whatever ``num_proc`` is.
    """
    kw = dict(add_special_tokens=add_special_tokens, append_eod=append_eod)
    if num_proc <= 1:
        for batch in _batches(texts, batch_size):
            yield from tokenize_texts(tokenizer, batch, **kw)
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(num_proc, initializer=_worker_init, initargs=(tokenizer, kw)) as pool:
        for out in pool.imap(_worker_tokenize, _batches(texts, batch_size), chunksize=1):
            yield from out


class PromptedText:
    """``tokens -> tokens of prompt + text``: a query prompt for texts that are already tokenised
    (a corpus may hold no strings: Megatron .bin/.idx). The text is decoded (without the BOS the
    tokenizer adds) and ``prompt + text`` tokenised again, exactly what inference tokenises
    (GEMEmbedder.encode_queries, sentence-transformers prompts prepend the string), so the
    boundary tokens match; prepending the prompt's own tokens would not (``"query: "`` ends in a
    space that BPE merges into the next word)."""

    def __init__(self, tokenizer, prompt: str):
        if not prompt:
            raise ValueError("PromptedText needs a non-empty prompt")
        self.tokenizer, self.prompt = tokenizer, prompt
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id else None

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        body = tokens[1:] if self.bos is not None and tokens.shape[0] and int(tokens[0]) == self.bos else tokens
        text = self.tokenizer.decode(body.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return np.asarray(self.tokenizer(self.prompt + text, add_special_tokens=True)["input_ids"], dtype=np.int64)
