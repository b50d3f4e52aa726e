"""gem_mask against a brute-force, pair-by-pair reading of the rule in docs/method.md."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_gem import Role, gem_mask
from megatron_gem.gem import PAD_DOC_ID, build_layout, flex_mask_mod

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


def brute_force(docs, roles, suffix_sees_bos):
    """The rule read literally, one pair at a time."""
    docs, roles = docs.tolist(), roles.tolist()
    L = len(docs)
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if docs[q] != docs[k] or k > q:
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
