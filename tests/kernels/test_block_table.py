"""The block table against the dense GEM mask reduced per tile (the truth)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_gem.gem.mask import gem_mask
from megatron_gem.gem.roles import Role
from megatron_gem.kernels.block_table import (
    EMPTY,
    FULL,
    PARTIAL,
    allowed_pair_count,
    build_block_table,
    check_contiguous_documents,
    classify_blocks,
)
from megatron_gem.kernels.reference import STYLES, random_batch

TILINGS = ((16, 16), (32, 16), (16, 32), (64, 64))


def dense_tiles(mask: torch.Tensor, bm: int, bn: int):
    """Per tile of the dense mask [B, L, L]: any allowed pair, every in-bounds pair allowed, complete."""
    B, L, _ = mask.shape
    nq, nk = -(-L // bm), -(-L // bn)
    pad = (0, nk * bn - L, 0, nq * bm - L)
    m = F.pad(mask, pad).view(B, nq, bm, nk, bn)
    inb = F.pad(torch.ones(L, L, dtype=torch.bool), pad).view(nq, bm, nk, bn)
    any_ = m.any(4).any(2)
    all_ = (m | ~inb).all(4).all(2)
    complete = inb.all(3).all(1)[None]
    return any_, all_, complete


def check_table(doc, role, bm, bn, bos):
    kind = classify_blocks(doc, role, block_m=bm, block_n=bn, suffix_sees_bos=bos)
    any_, all_, complete = dense_tiles(gem_mask(doc, role, suffix_sees_bos=bos), bm, bn)
    # Visited set == tiles holding an allowed pair (no empty tile visited, none missed).
    assert torch.equal(kind != EMPTY, any_)
    # FULL tiles really are full; and between complete blocks FULL is exact (no full tile lost).
    assert not ((kind == FULL) & ~all_).any()
    assert torch.equal(kind == FULL, all_ & complete)
    # The lists (both directions) encode exactly this classification.
    t = build_block_table(doc, role, block_m=bm, block_n=bn, suffix_sees_bos=bos)
    assert torch.equal(t.to_dense(), kind)
    assert torch.equal(t.to_dense_transposed(), kind.transpose(1, 2))
    return kind


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("bm,bn", TILINGS)
@pytest.mark.parametrize("bos", [False, True])
def test_table_matches_dense_mask(style, bm, bn, bos):
    for seed in range(8):
        L = (37, 64, 100, 131)[seed % 4]
        K = (1, 2, 5, 10)[seed % 4]
        doc, role = random_batch(seed, 2, L, K, styles=(style, "mixed"), block=bm)
        check_table(doc, role, bm, bn, bos)


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    roles_seed=st.integers(0, 2**31 - 1),
    pad=st.integers(0, 20),
    tiling=st.sampled_from(TILINGS),
    bos=st.booleans(),
)
def test_table_matches_dense_mask_hypothesis(lengths, roles_seed, pad, tiling, bos):
    """Any document lengths and any role sequence (not only PREFIX* SPECIAL* SUFFIX*)."""
    rng = np.random.default_rng(roles_seed)
    doc = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)])
    role = rng.integers(0, 3, size=doc.shape[0])
    check_table(torch.from_numpy(doc)[None], torch.from_numpy(role)[None], *tiling, bos)


def test_lists_are_ascending_and_in_range():
    doc, role = random_batch(3, 3, 150, 2, styles=("mixed", "plain", "straddle"))
    t = build_block_table(doc, role, block_m=16, block_n=16)
    for num, idx, n in (
        (t.kv_num_blocks, t.kv_indices, t.num_kv_blocks),
        (t.full_kv_num_blocks, t.full_kv_indices, t.num_kv_blocks),
        (t.q_num_blocks, t.q_indices, t.num_q_blocks),
        (t.full_q_num_blocks, t.full_q_indices, t.num_q_blocks),
    ):
        assert idx.dtype == torch.int32 and num.dtype == torch.int32
        assert idx.shape[-1] == max(int(num.max()), 1)
        for b in range(num.shape[0]):
            for r in range(num.shape[1]):
                used = idx[b, r, : num[b, r]]
                assert torch.all(used[1:] > used[:-1]) and torch.all((used >= 0) & (used < n))


def test_plain_causal_row_is_triangle():
    """One plain document: the causal triangle, diagonal tiles PARTIAL, the rest FULL."""
    L, B = 128, 16
    doc = torch.zeros(1, L, dtype=torch.long)
    role = torch.full((1, L), int(Role.PREFIX))
    kind = classify_blocks(doc, role, block_m=B, block_n=B)[0]
    n = L // B
    expected = torch.tril(torch.full((n, n), FULL, dtype=torch.int8), -1) + torch.diag(torch.full((n,), PARTIAL, dtype=torch.int8))
    assert torch.equal(kind, expected)


def test_suffix_rows_skip_prefix_blocks():
    """A long split document: suffix query blocks never visit pure-prefix key blocks."""
    L, B = 128, 16
    doc = torch.zeros(1, L, dtype=torch.long)
    role = torch.tensor([0] * 40 + [1] * 2 + [2] * 86)[None]
    kind = classify_blocks(doc, role, block_m=B, block_n=B)[0]
    # query blocks 3.. (positions >= 48) are all SUFFIX; key blocks 0, 1 (positions < 32) all PREFIX
    assert torch.all(kind[3:, :2] == EMPTY)
    # with suffix_sees_bos, key block 0 holds the document start: PARTIAL, block 1 stays EMPTY
    kind_bos = classify_blocks(doc, role, block_m=B, block_n=B, suffix_sees_bos=True)[0]
    assert torch.all(kind_bos[3:, 0] == PARTIAL) and torch.all(kind_bos[3:, 1] == EMPTY)


def test_allowed_pair_count_matches_dense():
    for seed, style in enumerate(STYLES):
        doc, role = random_batch(seed, 3, 97, 5, styles=(style, "mixed", "tiny"))
        for bos in (False, True):
            got = allowed_pair_count(doc, role, suffix_sees_bos=bos)
            assert torch.equal(got, gem_mask(doc, role, suffix_sees_bos=bos).sum((-1, -2)))


def test_reused_doc_label_is_rejected():
    doc = torch.tensor([[0, 0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="two separate runs"):
        check_contiguous_documents(doc)
    with pytest.raises(ValueError, match="two separate runs"):
        build_block_table(doc, torch.zeros_like(doc), block_m=16, block_n=16)
    check_contiguous_documents(torch.tensor([[3, 3, 7, -1, -1]]))


@pytest.mark.parametrize("bm,bn", [(15, 16), (16, 1)])
def test_odd_or_tiny_blocks_rejected(bm, bn):
    doc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="even"):
        classify_blocks(doc, doc, block_m=bm, block_n=bn)


def check_window_table(doc, role, bm, bn, bos, window):
    """With a sliding window the table must stay sound: every tile holding an allowed pair is
    visited, every FULL tile is full; and the window must skip tiles (no visit is farther back
    than the window reaches)."""
    kind = classify_blocks(doc, role, block_m=bm, block_n=bn, suffix_sees_bos=bos, sliding_window=window)
    any_, all_, complete = dense_tiles(gem_mask(doc, role, suffix_sees_bos=bos, sliding_window=window), bm, bn)
    assert not (any_ & (kind == EMPTY)).any(), "a tile with an allowed pair is skipped"
    assert not ((kind == FULL) & ~all_).any(), "a FULL tile holds a masked pair"
    L = doc.shape[1]
    nq, nk = kind.shape[1:]
    first_q = torch.arange(nq)[:, None] * bm
    last_k = torch.clamp(torch.arange(nk)[None, :] * bn + bn, max=L) - 1
    assert not ((kind != EMPTY) & (first_q - last_k >= window)[None]).any(), "a tile wholly out of the window is visited"
    t = build_block_table(doc, role, block_m=bm, block_n=bn, suffix_sees_bos=bos, sliding_window=window)
    assert torch.equal(t.to_dense(), kind) and torch.equal(t.to_dense_transposed(), kind.transpose(1, 2))
    assert t.sliding_window == window


@pytest.mark.parametrize("window", [1, 5, 16, 40, 200])
@pytest.mark.parametrize("bm,bn", TILINGS)
def test_table_with_window_is_sound(window, bm, bn):
    for seed, style in enumerate(STYLES):
        L = (37, 100, 131)[seed % 3]
        doc, role = random_batch(seed, 2, L, (1, 2, 5)[seed % 3], styles=(style, "long"), block=bm)
        check_window_table(doc, role, bm, bn, seed % 2 == 1, window)


def test_window_makes_a_long_document_banded():
    """One plain document, W = 32, 16 x 16 tiles: each query block visits its diagonal tile and
    the two or three tiles behind it that the window reaches, and none further back."""
    L, B, W = 160, 16, 32
    doc = torch.zeros(1, L, dtype=torch.long)
    kind = classify_blocks(doc, torch.zeros_like(doc), block_m=B, block_n=B, sliding_window=W)[0]
    for i in range(L // B):
        visited = (kind[i] != EMPTY).nonzero().flatten().tolist()
        assert visited == list(range(max(0, i - 2), i + 1)), (i, visited)
        # the tile one block back is entirely within the window: FULL; two back only partly
        if i >= 1:
            assert kind[i, i - 1] == FULL
        if i >= 2:
            assert kind[i, i - 2] == PARTIAL


@pytest.mark.parametrize("window", [1, 3, 17])
def test_allowed_pair_count_with_window(window):
    for seed, style in enumerate(STYLES):
        doc, role = random_batch(seed, 2, 97, 5, styles=(style, "mixed"))
        for bos in (False, True):
            got = allowed_pair_count(doc, role, suffix_sees_bos=bos, sliding_window=window)
            assert torch.equal(got, gem_mask(doc, role, suffix_sees_bos=bos, sliding_window=window).sum((-1, -2)))


def test_untrimmed_lists_are_full_width_and_equal():
    doc, role = random_batch(4, 2, 150, 2, styles=("mixed", "straddle"))
    a = build_block_table(doc, role, block_m=16, block_n=32)
    b = build_block_table(doc, role, block_m=16, block_n=32, trim=False, validate=False)
    assert b.kv_indices.shape[-1] == a.num_kv_blocks and b.q_indices.shape[-1] == a.num_q_blocks
    assert torch.equal(a.to_dense(), b.to_dense()) and torch.equal(a.to_dense_transposed(), b.to_dense_transposed())
