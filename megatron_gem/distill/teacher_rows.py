"""The teacher's rows of a contrastive batch: what the loss compares the student's with.

A contrastive batch (data/datasets.py ``ContrastiveDataset`` with ``texts``) carries the raw
strings of its documents as ``batch["texts"]``, in the document order of its rows (anchors,
positives, hard negatives; a GradCache batch per chunk). ``embed_batch`` embeds them with the
teacher once (one call for the whole micro-batch: the teacher's cache and its de-duplication see
every text of it) and stores ``batch["teacher"]`` (float32 [2N + M, d_t] on the CPU, L2-
normalised, no gradient), per chunk for a GradCache batch; gem.losses.micro_batch_loss and
training/grad_cache.py read it from there.
"""

from __future__ import annotations

from .teacher import Teacher


def _texts(batch: dict) -> list[str]:
    texts = batch.get("texts")
    if texts is None:
        raise ValueError("a contrastive batch without its raw texts (the data set was built without texts=): the teacher has nothing to embed")
    expected = 2 * int(batch["num_texts"]) + int(batch.get("num_negatives", 0))
    if len(texts) != expected:
        raise ValueError(f"a contrastive batch with {len(texts)} raw texts for {expected} documents")
    return list(texts)


def embed_batch(teacher: Teacher, batch: dict) -> dict:
    """Add the teacher's rows of ``batch``'s texts (see the module docstring); returns ``batch``."""
    chunks = batch.get("chunks")
    parts = chunks if chunks is not None else [batch]
    texts = [_texts(p) for p in parts]
    rows = teacher.embed([t for part in texts for t in part])
    start = 0
    for part, part_texts in zip(parts, texts):
        part["teacher"] = rows[start : start + len(part_texts)]
        start += len(part_texts)
    return batch
