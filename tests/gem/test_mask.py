"""gem_mask against a brute-force, pair-by-pair reading of the rule in docs/method.md."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_gem import Role, gem_mask
from megatron_gem.gem import PAD_DOC_ID, build_layout, flex_mask_mod
from megatron_gem.gem.mask import equals_causal_mask, gem_mask_for_queries

SPECIAL_BASE = 1000


@st.composite
def packed_rows(draw, max_docs=5):
    """A packed row: documents in random layouts with K in {1,2,5,10}, optional padding."""
    K = draw(st.sampled_from([1, 2, 5, 10]))
    specials = list(range(SPECIAL_BASE, SPECIAL_BASE + K))
    ids, roles, docs = [], [], []
    for d in range(draw(st.integers(1, max_docs))):
        n = draw(st.integers(1, 12))
        tokens = list(range(1, n + 1))
        layout = draw(st.sampled_from(["plain", "split", "reconstruct", "embed"]))
        if layout == "split" and n < 2:
            layout = "plain"
        cut = draw(st.integers(1, n - 1)) if layout == "split" else None
        i, r = build_layout(tokens, layout, specials, cut=cut)
        ids += i.tolist()
        roles += r.tolist()
        docs += [d * 7 + 3] * len(i)  # arbitrary labels that change at boundaries
    pad = draw(st.integers(0, 4))
    roles += [int(Role.PREFIX)] * pad
    docs += [PAD_DOC_ID] * pad
    return torch.tensor(docs), torch.tensor(roles)


def brute_force(docs, roles, suffix_sees_bos, window=None):
    """The rule read literally, one pair at a time (``window``: Mistral's, query q sees keys k
    with q - W < k <= q)."""
    docs, roles = docs.tolist(), roles.tolist()
    L = len(docs)
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if docs[q] != docs[k] or k > q:
                continue
            if window is not None and k <= q - window:
                continue
            first_of_doc = k == 0 or docs[k - 1] != docs[k]
            if roles[q] == Role.SUFFIX and roles[k] == Role.PREFIX and not (suffix_sees_bos and first_of_doc):
                continue
            if roles[q] == Role.SPECIAL and roles[k] == Role.SPECIAL and q != k:
                continue
            out[q, k] = True
    return out


@settings(max_examples=150, deadline=None)
@given(row=packed_rows(), suffix_sees_bos=st.booleans())
def test_gem_mask_matches_brute_force(row, suffix_sees_bos):
    docs, roles = row
    expected = brute_force(docs, roles, suffix_sees_bos)
    assert torch.equal(gem_mask(docs, roles, suffix_sees_bos=suffix_sees_bos), expected)
    assert expected.diagonal().all(), "every token must see itself"


@settings(max_examples=40, deadline=None)
@given(a=packed_rows(), b=packed_rows())
def test_batched_mask_is_per_row(a, b):
    L = max(a[0].numel(), b[0].numel())

    def pad(t, value):
        return torch.cat([t, torch.full((L - t.numel(),), value, dtype=t.dtype)])

    docs = torch.stack([pad(a[0], PAD_DOC_ID), pad(b[0], PAD_DOC_ID)])
    roles = torch.stack([pad(a[1], 0), pad(b[1], 0)])
    batched = gem_mask(docs, roles)
    for i in range(2):
        assert torch.equal(batched[i], gem_mask(docs[i], roles[i]))


@settings(max_examples=30, deadline=None)
@given(row=packed_rows(), suffix_sees_bos=st.booleans())
def test_flex_mask_mod_matches_dense(row, suffix_sees_bos):
    from torch.nn.attention.flex_attention import create_mask

    docs, roles = row
    L = docs.numel()
    mod = flex_mask_mod(docs, roles, suffix_sees_bos=suffix_sees_bos)
    flex = create_mask(mod, 1, 1, L, L, device="cpu")[0, 0]
    assert torch.equal(flex, gem_mask(docs, roles, suffix_sees_bos=suffix_sees_bos))


def test_known_split_mask():
    # BOS a b | S1 S2 | c d   (K=2, cut=3)
    _, roles = build_layout([1, 5, 6, 7, 8], "split", [100, 101], cut=3)
    docs = torch.zeros(len(roles), dtype=torch.long)
    m = gem_mask(docs, torch.as_tensor(roles))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],  # S1 sees the prefix and itself
            [1, 1, 1, 0, 1, 0, 0],  # S2 does not see S1
            [0, 0, 0, 1, 1, 1, 0],  # suffix sees only the specials and itself
            [0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    m_bos = gem_mask(docs, torch.as_tensor(roles), suffix_sees_bos=True)
    assert m_bos[5, 0] and m_bos[6, 0] and not m_bos[5, 1]


def test_bad_inputs_are_refused():
    import pytest

    with pytest.raises(ValueError, match="differ in shape"):
        gem_mask(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        gem_mask(torch.zeros(3), torch.zeros(3))


@settings(max_examples=150, deadline=None)
@given(row=packed_rows(), suffix_sees_bos=st.booleans(), window=st.integers(1, 12))
def test_sliding_window_matches_brute_force(row, suffix_sees_bos, window):
    docs, roles = row
    expected = brute_force(docs, roles, suffix_sees_bos, window)
    assert torch.equal(gem_mask(docs, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=window), expected)
    assert expected.diagonal().all(), "the window keeps every token's view of itself"
    # the same pairs through the key-list form (the cached path), queries = every position
    idx = torch.arange(docs.numel())[None]
    starts = torch.tensor([[k == 0 or docs[k - 1] != docs[k] for k in range(docs.numel())]])
    got = gem_mask_for_queries(
        idx, docs[None], roles[None], idx, docs[None], roles[None], k_is_doc_start=starts, suffix_sees_bos=suffix_sees_bos, sliding_window=window
    )[0]
    assert torch.equal(got, expected)


@settings(max_examples=30, deadline=None)
@given(row=packed_rows(), suffix_sees_bos=st.booleans(), window=st.integers(1, 12))
def test_flex_mask_mod_with_window_matches_brute_force(row, suffix_sees_bos, window):
    from torch.nn.attention.flex_attention import create_mask

    docs, roles = row
    L = docs.numel()
    mod = flex_mask_mod(docs, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=window)
    assert torch.equal(create_mask(mod, 1, 1, L, L, device="cpu")[0, 0], brute_force(docs, roles, suffix_sees_bos, window))


def test_window_counts_row_positions():
    """Query 5 of one plain document with W = 3 sees keys 3, 4, 5 (transformers' Mistral rule)."""
    docs = torch.zeros(8, dtype=torch.long)
    m = gem_mask(docs, torch.zeros_like(docs), sliding_window=3)
    assert m[5].nonzero().flatten().tolist() == [3, 4, 5]


def test_bad_window_is_refused():
    import pytest

    docs = torch.zeros(4, dtype=torch.long)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window"):
            gem_mask(docs, docs, sliding_window=bad)


@st.composite
def maybe_causal_rows(draw, L):
    """Rows of length L that are often plain causal (one document, at most one special token),
    often not (split layouts, random roles, two documents, a padding tail)."""
    P, S = int(Role.PREFIX), int(Role.SPECIAL)
    kind = draw(st.sampled_from(["plain", "embed", "split", "random", "two_docs", "padded"]))
    docs = [0] * L
    if kind == "plain":
        roles = [P] * L
    elif kind == "embed":  # text SPECIAL (K = 1)
        roles = [P] * (L - 1) + [S]
    elif kind == "split" and L >= 3:
        roles = build_layout(list(range(1, L)), "split", [SPECIAL_BASE], cut=draw(st.integers(1, L - 2)))[1].tolist()
    else:
        roles = draw(st.lists(st.integers(0, 2), min_size=L, max_size=L))
    if kind == "two_docs" and L > 1:
        cut = draw(st.integers(1, L - 1))
        docs = [0] * cut + [1] * (L - cut)
    if kind == "padded" and L > 1:
        docs[-1], roles[-1] = PAD_DOC_ID, P
    return docs, roles


@settings(max_examples=200, deadline=None)
@given(data=st.data(), L=st.integers(1, 14), B=st.integers(1, 2), suffix_sees_bos=st.booleans(), window=st.one_of(st.none(), st.integers(1, 16)))
def test_equals_causal_mask_matches_brute_force(data, L, B, suffix_sees_bos, window):
    """equals_causal_mask is True exactly when every row's brute-force GEM mask is the causal triangle."""
    rows = [data.draw(maybe_causal_rows(L)) for _ in range(B)]
    docs = torch.tensor([r[0] for r in rows])
    roles = torch.tensor([r[1] for r in rows])
    tril = torch.ones(L, L, dtype=torch.bool).tril()
    expected = all(torch.equal(brute_force(d, r, suffix_sees_bos, window), tril) for d, r in zip(docs, roles))
    got = equals_causal_mask(docs, roles, suffix_sees_bos=suffix_sees_bos, sliding_window=window)
    assert got.dim() == 0 and bool(got) == expected


def test_equals_causal_mask_known_layouts():
    text = [int(Role.PREFIX)] * 6
    one = torch.zeros(1, 7, dtype=torch.long)
    assert equals_causal_mask(one[:, :6], torch.tensor([text]))  # plain text
    assert equals_causal_mask(one, torch.tensor([text + [int(Role.SPECIAL)]]))  # text SPECIAL, K = 1
    two = torch.tensor([text + [int(Role.SPECIAL)] * 2])
    assert not equals_causal_mask(torch.zeros(1, 8, dtype=torch.long), two)  # K = 2: specials hide each other
    assert not equals_causal_mask(torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.zeros(1, 6, dtype=torch.long))  # packed
    assert not equals_causal_mask(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), sliding_window=5)
    assert equals_causal_mask(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), sliding_window=6)
