"""Held-out perplexity of an HF causal LM: the "generation stays" half of the GEM claim."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def tokenize_with_bos(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens, and the BOS token put in
    front when the tokenizer has one but does not add it (SmolLM2's does not), so every text
    is scored with the same first context token. Cut to ``max_length``."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids[:max_length] if max_length else ids


@torch.inference_mode()
def heldout_perplexity(model, tokenizer, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8, show_progress_bar: bool = False) -> float:
    """Token-level perplexity exp(total NLL / predicted tokens) over ``texts``.

    Each text is one sequence (BOS first as context, never predicted; cut at ``max_length``
    tokens); every later token is predicted from the ones before it. Padding is neither
    context nor target. The model runs in eval mode on its own device; runs sorted by length.
    """
    if isinstance(texts, str):
        raise TypeError("heldout_perplexity() takes a list of texts, not a single string")
    seqs = [tokenize_with_bos(tokenizer, t, max_length) for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no text has at least one token to predict")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    starts = range(0, len(order), batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    nll, count = 0.0, 0
    try:
        for s in starts:
            batch = [seqs[i] for i in order[s : s + batch_size]]
            width = max(len(x) for x in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, x in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(nll / count)
