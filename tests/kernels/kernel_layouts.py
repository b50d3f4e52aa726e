"""Random packed GEM layouts for the kernel tests (helper module, not a test file).

A row is a sequence of documents, each laid out as plain / split / reconstruct / embed with K
special tokens, optionally followed by a padding run (doc_id PAD_DOC_ID). The generators aim at
the cases a block-sparse kernel gets wrong: one-token documents, special runs that straddle a
block edge, all-plain rows, a single long document, rows of different layouts in one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_gem.gem.roles import PAD_DOC_ID, Role

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def _document(rng: np.random.Generator, n: int, k: int, kind: str) -> list[int]:
    """Roles of one document of exactly n tokens."""
    if kind == "plain" or n < 2:
        return [P] * n
    if kind == "embed":
        k = min(k, n - 1)
        return [P] * (n - k) + [S] * k
    k = min(k, n - 2) if n > 2 else 0
    if k == 0:
        return [P] * n
    cut = int(rng.integers(1, n - k))  # >= 1 prefix token and >= 1 suffix token
    return [P] * cut + [S] * k + [X] * (n - k - cut)


def random_row(rng: np.random.Generator, L: int, k: int, *, style: str = "mixed", block: int = 16, pad: bool | None = None):
    """(doc_ids, roles) int64 numpy arrays of length L.

    style: mixed (random lengths incl. 1-token docs), plain (no special tokens), long (one
    document), straddle (special runs placed across multiples of ``block``), tiny (1-3 tokens), chaos (roles in random order).
    """
    docs, roles = [], []
    if pad is None:
        pad = bool(rng.random() < 0.5)
    body = L - (int(rng.integers(1, max(2, L // 4))) if pad else 0)
    pos = 0
    d = 0
    while pos < body:
        room = body - pos
        if style == "long":
            n = room
        elif style == "tiny":
            n = int(rng.integers(1, 4))
        elif style == "straddle":
            # end the prefix just before the next block edge so the K specials cross it
            edge = (pos // block + 1) * block
            cut = max(1, edge - pos - max(1, k // 2))
            n = cut + k + int(rng.integers(1, 2 * block))
        else:
            n = int(rng.choice([1, 2, int(rng.integers(3, 20)), int(rng.integers(20, 3 * block + 1))]))
        n = min(n, room)
        if style == "chaos":  # roles in any order: the rule and the table must not assume PRE*SPE*SUF
            r = [int(x) for x in rng.integers(0, 3, size=n)]
        elif style == "straddle" and n >= cut + k + 1:
            r = [P] * cut + [S] * k + [X] * (n - cut - k)
        else:
            kind = "plain" if style == "plain" else str(rng.choice(["plain", "split", "split", "reconstruct", "embed"]))
            r = _document(rng, n, k, kind)
        docs += [d] * n
        roles += r
        pos += n
        d += 1
    docs += [PAD_DOC_ID] * (L - body)
    roles += [P] * (L - body)
    return np.array(docs, dtype=np.int64), np.array(roles, dtype=np.int64)


def random_batch(seed: int, B: int, L: int, k: int, styles=("mixed",), block: int = 16):
    """doc_ids, roles as int64 torch tensors [B, L]; row b uses styles[b % len(styles)]."""
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, L, k, style=styles[b % len(styles)], block=block) for b in range(B)]
    doc = torch.from_numpy(np.stack([r[0] for r in rows]))
    role = torch.from_numpy(np.stack([r[1] for r in rows]))
    return doc, role
