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


def heldout_texts(n: int | None, seed: int = 0) -> list[str]:
    """The held-out perplexity paragraphs (Python tutorial) the reproduction and lm.py score:
    ``n`` of them, a fixed subsample (``seed``)."""
    from .builders import _subsample
    from .corpora import python_doc_paragraphs

    return _subsample(python_doc_paragraphs(), n, seed)


@torch.inference_mode()
def plain_logits_identical(model_a, model_b, tokenizer, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8) -> tuple[bool, str]:
    """Do two causal LMs give bit-identical logits on plain text (``torch.equal``, no
    tolerance)? The check behind "generation unchanged" for a frozen-base (summary mode) export:
    every text is run through both models with the same batches (BOS first, cut at
    ``max_length``, right padding masked). Returns (identical, what differed first)."""
    seqs = [tokenize_with_bos(tokenizer, t, max_length) for t in texts]
    if not seqs:
        raise ValueError("no texts to compare")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    flags = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for s in range(0, len(seqs), batch_size):
            batch = seqs[s : s + batch_size]
            width = max(len(x) for x in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, x in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            outs = []
            for m in (model_a, model_b):
                dev = next(m.parameters()).device
                logits = m(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.cpu()
                outs.append(logits[mask.bool()])  # real tokens only: padded positions are not text
            a, b = outs
            if a.shape != b.shape or a.dtype != b.dtype:
                return False, f"texts {s}..{s + len(batch) - 1}: logits {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                return False, f"texts {s}..{s + len(batch) - 1}: logits differ (max |diff| {diff:.3g})"
    finally:
        model_a.train(flags[0])
        model_b.train(flags[1])
    return True, f"{len(seqs)} texts, {sum(map(len, seqs))} tokens: logits bit-identical"
