"""Packing: the bounded best-fit packer, row assembly and the micro-batch contract."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_gem.data import BestFitPacker, assemble_row, collate_rows, pack_lengths, pack_texts
from megatron_gem.gem import IGNORE_INDEX, PAD_DOC_ID, Role, next_token_labels


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=200), st.integers(1, 8))
def test_pack_lengths_places_each_piece_once_within_capacity(lengths, open_rows):
    offsets, order = pack_lengths(lengths, 50, open_rows)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    for r in range(len(offsets) - 1):
        row = order[offsets[r] : offsets[r + 1]]
        assert len(row) >= 1 and sum(lengths[i] for i in row) <= 50
        assert list(row) == sorted(row)  # pieces keep their order inside a row
    # deterministic
    o2, r2 = pack_lengths(lengths, 50, open_rows)
    assert np.array_equal(o2, offsets) and np.array_equal(r2, order)


def test_best_fit_padding_on_a_realistic_length_mix():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, size=20000).astype(int) + 1, 4096)
    offsets, order = pack_lengths(lengths, 4096)
    pad = 1 - lengths.sum() / (4096 * (len(offsets) - 1))
    assert pad < 0.01, pad
    # what the simple alternative (next-fit, one open row) would waste, for scale
    offsets1, _ = pack_lengths(lengths, 4096, max_open_rows=1)
    assert 1 - lengths.sum() / (4096 * (len(offsets1) - 1)) > 3 * pad


def test_packer_rejects_oversized_piece():
    with pytest.raises(ValueError, match="cannot go in a row"):
        BestFitPacker(10).add("x", 11)


def _piece(ids, roles):
    return np.asarray(ids, dtype=np.int64), np.asarray(roles, dtype=np.int8)


P, S, X = Role.PREFIX, Role.SPECIAL, Role.SUFFIX


def test_collate_contract():
    rows = [
        assemble_row([_piece([1, 5, 6], [P, P, P]), _piece([1, 7, 99, 8, 9], [P, P, S, X, X])], 10, pad_id=3),
        assemble_row([_piece([1, 4, 4, 4], [P] * 4)], 10, pad_id=3),
    ]
    b = collate_rows(rows)
    assert set(b) == {"input_ids", "labels", "position_ids", "doc_ids", "roles"}
    for v in b.values():
        assert v.dtype == torch.int64 and v.shape == (2, 10)
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, -1, -1], [2, 2, 2, 2, -1, -1, -1, -1, -1, -1]]
    assert b["position_ids"].tolist()[0] == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert b["input_ids"].tolist()[1] == [1, 4, 4, 4, 3, 3, 3, 3, 3, 3]
    I = IGNORE_INDEX
    # 7 -> I (next is special), special 99 predicts 8, last token of each document -> I
    assert b["labels"].tolist()[0] == [5, 6, I, 7, I, 8, 9, I, I, I]
    assert torch.equal(b["labels"], next_token_labels(b["input_ids"], b["roles"], b["doc_ids"]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(1, 4))
def test_rows_padding_only_at_end_and_labels_never_special(lengths, k):
    rng = np.random.default_rng(len(lengths))
    pieces = []
    for n in lengths:
        ids = rng.integers(10, 100, size=n + k)
        roles = np.full(n + k, P, dtype=np.int8)
        c = int(rng.integers(0, n + 1))
        roles[c : c + k] = S
        roles[c + k :] = X
        ids[c : c + k] = 1000
        pieces.append((ids, roles))
    offsets, order = pack_lengths([len(p[0]) for p in pieces], 40)
    rows = [assemble_row([pieces[i] for i in order[offsets[r] : offsets[r + 1]]], 40) for r in range(len(offsets) - 1)]
    b = collate_rows(rows)
    pad = b["doc_ids"] == PAD_DOC_ID
    # once padding starts, it runs to the end of the row
    assert torch.equal(pad, torch.cummax(pad.int(), dim=1).values.bool())
    real = b["doc_ids"][~pad]
    assert int(real.max()) + 1 == len(pieces) == len(torch.unique(real))
    assert not torch.isin(b["labels"], torch.tensor([1000])).any()
    assert (b["labels"][pad] == IGNORE_INDEX).all()
    assert int((~pad).sum()) == sum(len(p[0]) for p in pieces)


def test_pack_texts_ffd_and_fixed_rows():
    texts = [_piece([1] * n, [P] * (n - 1) + [S]) for n in (6, 3, 5, 2)]
    rows = pack_texts(texts, 8)
    assert len(rows) == 2
    b = collate_rows(rows, renumber=False)
    assert sorted(set(b["doc_ids"].flatten().tolist()) - {PAD_DOC_ID}) == [0, 1, 2, 3]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 3, 3], [1, 1, 1, 2, 2, 2, 2, 2]]
    assert len(pack_texts(texts, 8, num_rows=3)) == 3
    with pytest.raises(ValueError, match="need 2 rows"):
        pack_texts(texts, 8, num_rows=1)
