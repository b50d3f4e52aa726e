"""The workloads the kernel parts measure: document lengths of a real corpus (an embedded
128-quantile table where the corpus is not installed) and packed rows of them (doc_ids, roles),
plain, document-causal or laid out by the GEM rule."""

from __future__ import annotations

import glob
import math

import numpy as np
import torch

CORPUS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
BYTES_PER_TOKEN = 4
N_QUANTILES = 128
# corpus_length_table() on the development machine (2026, Debian python3.11-doc 3.11.2-6+deb12u8:
# 497 reST sources, 67,473 paragraphs of >= 20 characters, tokens = ceil(UTF-8 bytes / 4),
# median 25, mean 39.9, p99 187, max 4838): the 128 quantiles at (i + 0.5) / 128. The device has
# no such corpus, so it samples from this table; tests/kernels/test_gpu_check.py recomputes it
# from the corpus where installed and checks it equals this table.
EMBEDDED_LENGTHS = (
    5,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    7,
    7,
    7,
    7,
    7,
    8,
    8,
    8,
    8,
    9,
    9,
    9,
    9,
    10,
    10,
    10,
    10,
    11,
    11,
    11,
    12,
    12,
    12,
    12,
    13,
    13,
    13,
    14,
    14,
    14,
    15,
    15,
    15,
    16,
    16,
    16,
    17,
    17,
    18,
    18,
    18,
    19,
    19,
    20,
    20,
    21,
    21,
    22,
    22,
    23,
    23,
    24,
    24,
    25,
    26,
    26,
    27,
    27,
    28,
    29,
    29,
    30,
    31,
    31,
    32,
    33,
    33,
    34,
    35,
    36,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    45,
    46,
    47,
    48,
    49,
    50,
    52,
    53,
    54,
    55,
    57,
    58,
    59,
    61,
    62,
    64,
    66,
    67,
    69,
    71,
    73,
    75,
    77,
    79,
    82,
    85,
    87,
    91,
    94,
    98,
    103,
    107,
    113,
    120,
    128,
    139,
    153,
    178,
    260,
)
EMBEDDED_SOURCE = (
    "embedded table: 128 quantiles of the paragraph lengths of Debian python3.11-doc 3.11.2-6+deb12u8 "
    "(497 reST sources, 67,473 paragraphs >= 20 chars, tokens ~ UTF-8 bytes / 4), measured on the development machine"
)


def corpus_length_table(pattern: str = CORPUS_GLOB) -> tuple[np.ndarray, str] | None:
    """The 128-quantile table of paragraph lengths (estimated tokens) of the installed
    python3.11-doc reST sources, or None when the corpus is not installed."""
    files = sorted(glob.glob(pattern, recursive=True))
    lengths = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for para in f.read().split("\n\n"):
                para = para.strip()
                if len(para) >= 20:
                    lengths.append(math.ceil(len(para.encode()) / BYTES_PER_TOKEN))
    if not lengths:
        return None
    q = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    table = np.quantile(np.array(lengths), q, method="nearest").astype(np.int64)
    return (
        table,
        f"measured here: python3.11-doc reST paragraphs ({len(files)} files, {len(lengths)} paragraphs, tokens ~ bytes/{BYTES_PER_TOKEN}), {N_QUANTILES} quantiles",
    )


def document_lengths() -> tuple[np.ndarray, str]:
    got = corpus_length_table()
    if got is not None:
        return got
    return np.array(EMBEDDED_LENGTHS, dtype=np.int64), EMBEDDED_SOURCE


# ---------------------------------------------------------------------------------------------
# Packed rows (doc_ids, roles) for the speed and tuning parts
# ---------------------------------------------------------------------------------------------
def flashmask_doc_range(L: int) -> tuple[int, int]:
    """Documents per row of the FlashMask-style packing: 3-7 at <= 8k, 10-14 at >= 32k, 6-10 between."""
    if L <= 8192:
        return 3, 7
    if L >= 32768:
        return 10, 14
    return 6, 10


def corpus_docs(L: int, table: np.ndarray, rng: np.random.Generator) -> list[int]:
    out, total = [], 0
    while total < L:
        n = int(rng.choice(table))
        out.append(n)
        total += n
    return out


def flashmask_docs(L: int, rng: np.random.Generator) -> list[int]:
    lo, hi = flashmask_doc_range(L)
    n = int(rng.integers(lo, hi + 1))
    cuts = np.sort(rng.choice(np.arange(1, L), size=n - 1, replace=False))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [L]]))]


def layout_row(doc_lengths: list[int], L: int, gem: bool, rng: np.random.Generator):
    """doc_ids, roles int64 [1, L]: the documents in order, each plain (document-causal) or laid
    out by the GEM training rule (draw_layout: K=1, p_raw 0.8, split); the last one cut at L."""
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.layout import build_layout, draw_layout

    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    doc = np.zeros(L, dtype=np.int64)
    role = np.zeros(L, dtype=np.int64)
    pos, n_gem, n_docs = 0, 0, 0
    for d, n in enumerate(doc_lengths):
        if pos >= L:
            break
        layout, cut = draw_layout(n, config, rng) if gem else ("plain", None)
        _, r = build_layout(np.zeros(n, dtype=np.int64), layout, [0] * config.num_special_tokens, cut=cut)
        r = r[: L - pos]
        doc[pos : pos + len(r)] = d
        role[pos : pos + len(r)] = r
        pos += len(r)
        n_docs += 1
        n_gem += layout != "plain"
    return torch.from_numpy(doc)[None], torch.from_numpy(role)[None], {"documents": n_docs, "gem_documents": n_gem}


def make_mask(kind: str, L: int, table: np.ndarray, seed: int):
    """kind: causal | doc_corpus | gem_corpus | doc_flashmask | gem_flashmask."""
    if kind == "causal":
        z = torch.zeros(1, L, dtype=torch.int64)
        return z, z.clone(), {"documents": 1, "gem_documents": 0}
    packing = kind.split("_")[1]
    rng = np.random.default_rng([seed, L, 0 if packing == "corpus" else 1])
    lengths = corpus_docs(L, table, rng) if packing == "corpus" else flashmask_docs(L, rng)
    return layout_row(lengths, L, kind.startswith("gem"), rng)
