"""GEM pieces: chunking without loss, seeded layouts, the layout rules."""

import numpy as np
import pytest

from megatron_gem.data import SampleBuilder
from megatron_gem.data.samples import LAYOUT_CODES
from megatron_gem.gem import GEMConfig, Role

SPECIAL = [1000, 1001]


def cfg(**kw):
    kw.setdefault("num_special_tokens", len(SPECIAL))
    kw.setdefault("special_token_ids", SPECIAL)
    return GEMConfig(**kw)


def pieces_of(builder, docs, epoch=0):
    lengths = np.array([len(d) for d in docs])
    first = np.array([d[0] for d in docs])
    plan = builder.plan(np.arange(len(docs)), lengths, epoch, first)
    out = [builder.build(docs[plan.doc[i]], plan.start[i], plan.length[i], plan.layout[i], plan.cut[i]) for i in range(len(plan))]
    return plan, out


def test_chunking_keeps_every_token_and_fits_rows():
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 900, size=n) for n in (3, 60, 64, 65, 200, 1000)]
    for layout in ("split", "reconstruct"):
        b = SampleBuilder(cfg(p_raw=0.3, layout=layout), 64, seed=7, bos_id=None)
        plan, pieces = pieces_of(b, docs)
        for i, (ids, roles) in enumerate(pieces):
            assert len(ids) == plan.out_len[i] <= 64
            if plan.layout[i] == LAYOUT_CODES["plain"]:
                assert (roles == Role.PREFIX).all()
        # the document tokens (first copy, specials removed) come back in order, nothing dropped
        for d, doc in enumerate(docs):
            parts = []
            for i in np.flatnonzero(plan.doc == d):
                ids, roles = pieces[i]
                first_copy = ids[roles != Role.SPECIAL][: plan.length[i]]
                parts.append(first_copy)
            assert np.array_equal(np.concatenate(parts), doc)
        assert (plan.length <= b.max_chunk_tokens).all()


def test_layout_draw_is_per_document_and_respects_min_lengths():
    docs = [np.arange(10, 10 + n) for n in np.random.default_rng(1).integers(1, 40, size=300)]
    b = SampleBuilder(cfg(p_raw=0.5, min_prefix_len=4, min_suffix_len=3), 512, seed=3)
    plan, pieces = pieces_of(b, docs)
    split = plan.layout == LAYOUT_CODES["split"]
    assert 0.3 < split.mean() < 0.6
    assert (plan.length[split] >= 7).all()
    assert (plan.cut[split] >= 4).all() and (plan.length[split] - plan.cut[split] >= 3).all()
    for i in np.flatnonzero(split):
        ids, roles = pieces[i]
        c = plan.cut[i]
        assert (roles[:c] == Role.PREFIX).all() and (ids[c : c + 2] == SPECIAL).all() and (roles[c + 2 :] == Role.SUFFIX).all()
    # too short for a split: always plain
    assert (plan.layout[plan.length < 7] == 0).all()
    # the same document gets the same piece whatever order or company it is planned in
    rev = b.plan(np.arange(len(docs))[::-1], np.array([len(d) for d in docs])[::-1], 0)
    fwd_by_doc = {int(d): (int(l), int(c)) for d, l, c in zip(plan.doc, plan.layout, plan.cut)}
    rev_by_doc = {int(d): (int(l), int(c)) for d, l, c in zip(rev.doc, rev.layout, rev.cut)}
    assert fwd_by_doc == rev_by_doc
    # another epoch or seed draws differently
    other = b.plan(np.arange(len(docs)), np.array([len(d) for d in docs]), 1)
    assert not np.array_equal(other.layout, plan.layout)


def test_reconstruct_does_not_repeat_bos_and_p_raw_one_is_plain():
    bos = 1
    docs = [np.array([bos, 5, 6, 7, 8, 9]), np.array([bos] + list(range(20, 220)))]
    b = SampleBuilder(cfg(p_raw=0.0, layout="reconstruct"), 64, bos_id=bos)
    plan, pieces = pieces_of(b, docs)
    ids, roles = pieces[0]
    assert list(ids) == [1, 5, 6, 7, 8, 9, 1000, 1001, 5, 6, 7, 8, 9]
    assert b.max_chunk_tokens == 31
    assert all(len(p[0]) == n for p, n in zip(pieces, plan.out_len))
    raw = SampleBuilder(cfg(p_raw=1.0), 64)
    plan, _ = pieces_of(raw, docs)
    assert (plan.layout == 0).all() and raw.max_chunk_tokens == 64


def test_embed_pair_truncates_text_never_specials():
    b = SampleBuilder(cfg(prefix_dropout=0.3), 64, seed=5)
    doc = np.arange(100, 150)
    (a_ids, a_roles), (p_ids, p_roles), cut = b.embed_pair(doc, 4, 0, max_text_len=20)
    assert cut == 32 and list(a_ids) == list(range(100, 118)) + SPECIAL
    assert list(a_roles) == [Role.PREFIX] * 18 + [Role.SPECIAL] * 2
    assert list(p_ids[-2:]) == SPECIAL and len(p_ids) < len(a_ids) and p_ids[0] == 100
    assert set(p_ids[:-2]) <= set(a_ids[:-2])
    again = b.embed_pair(doc, 4, 0, max_text_len=20)[1][0]
    assert np.array_equal(again, p_ids)  # seeded by (seed, epoch, document)
    assert not np.array_equal(b.embed_pair(doc, 5, 0, max_text_len=20)[1][0], p_ids)


def test_builder_validates():
    with pytest.raises(ValueError, match="special_token_ids"):
        SampleBuilder(GEMConfig(num_special_tokens=2), 64)
    with pytest.raises(ValueError, match="too short"):
        SampleBuilder(cfg(), 3)


def test_fast_row_writer_equals_build_and_assemble():
    from megatron_gem.data import assemble_row

    rng = np.random.default_rng(3)
    docs = [np.concatenate([[1], rng.integers(5, 900, size=int(n))]) for n in rng.integers(1, 150, size=60)]
    for layout in ("split", "reconstruct"):
        b = SampleBuilder(cfg(p_raw=0.3, layout=layout), 160, seed=4, bos_id=1)
        plan, pieces = pieces_of(b, docs)
        for lo in range(0, len(plan), 5):
            sel = range(lo, min(lo + 5, len(plan)))
            if sum(plan.out_len[i] for i in sel) > 400:
                continue
            ref = assemble_row([pieces[i] for i in sel], 400, pad_id=3)
            ids, roles, seg = np.full(400, 3, np.int64), np.zeros(400, np.int8), np.full(400, -1, np.int64)
            pos = 0
            for n, i in enumerate(sel):
                chunk = docs[plan.doc[i]][plan.start[i] : plan.start[i] + plan.length[i]]
                end = b.write(ids, roles, pos, chunk, int(plan.layout[i]), int(plan.cut[i]), plan.start[i] == 0)
                seg[pos:end] = n
                pos = end
            assert np.array_equal(ids, ref[0]) and np.array_equal(roles, ref[1]) and np.array_equal(seg, ref[2])
        assert len(set(plan.layout.tolist())) == 2


def test_summary_mode_lays_every_piece_out_and_counts_the_short_ones():
    # Summary mode: plain text trains nothing (frozen base), so p_raw counts as 0 and a piece too
    # short for the split is left out and counted; labels keep only adapter-dependent targets.
    from megatron_gem.data import InMemoryCorpus, PackedDataset
    from megatron_gem.gem.roles import IGNORE_INDEX
    from megatron_gem.testing import make_tiny_tokenizer

    lengths = [3, 9, 2, 30, 8, 7, 40, 1]
    docs = [np.arange(10, 10 + n) for n in lengths]
    c = cfg(train_mode="summary", p_raw=0.8, min_prefix_len=4, min_suffix_len=4)
    b = SampleBuilder(c, 64, seed=3)
    plan, pieces = pieces_of(b, docs)
    assert (plan.layout == LAYOUT_CODES["split"]).all()
    short = sum(n < 8 for n in lengths)
    assert plan.skipped_short == short == 4 and len(plan) == len(lengths) - short
    assert sorted(plan.doc.tolist()) == [i for i, n in enumerate(lengths) if n >= 8]
    full = SampleBuilder(cfg(p_raw=0.8, min_prefix_len=4, min_suffix_len=4), 64, seed=3).plan(np.arange(len(docs)), np.array(lengths), 0)
    assert full.skipped_short == 0 and len(full) == len(lengths)

    tok = make_tiny_tokenizer()
    texts = ["one two", "The cat runs under the old tree while the dog sleeps near the river."] * 4
    corpus = InMemoryCorpus.from_texts(texts, tok)
    ds = PackedDataset(corpus, cfg(train_mode="summary", min_prefix_len=4, min_suffix_len=4), 64, seed=1)
    stats = ds.epoch_stats(0)
    assert stats.skipped["too_short_for_summary_layout"] == 4 and stats.layouts == {"split": 4}
    batch = ds.collate([ds[i] for i in range(ds.samples_in_epoch(0))])
    trained = batch["labels"] != IGNORE_INDEX
    assert trained.any() and not (trained & (batch["roles"] == Role.PREFIX)).any()
    assert trained[batch["roles"] == Role.SUFFIX].any()
    with pytest.raises(ValueError, match="too short"):
        PackedDataset(InMemoryCorpus.from_texts(["one two"], tok), cfg(train_mode="summary"), 64).plan(0)
