"""Distributed determinism and resume: ranks, workers, resume points, input kinds, streaming."""

import json

import numpy as np
import pytest
import torch

from megatron_gem.data import (
    ContrastiveDataset,
    GEMDataLoader,
    InMemoryCorpus,
    PackedDataset,
    StreamingPackedDataset,
    open_corpus,
)
from megatron_gem.data.preprocess import preprocess_to_indexed
from megatron_gem.gem import PAD_DOC_ID, GEMConfig, Role
from megatron_gem.testing import sample_sentences

SEQ = 96


@pytest.fixture(scope="module")
def gem_cfg(tiny_tokenizer):
    n = len(tiny_tokenizer)
    return GEMConfig(num_special_tokens=2, special_token_ids=[n, n + 1], p_raw=0.6, prefix_dropout=0.2)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i, s in enumerate(sample_sentences(400, seed=11)):
            # every 37th document is long enough to be chunked
            text = " ".join(sample_sentences(int(rng.integers(8, 20)), seed=i)) if i % 37 == 0 else s
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(jsonl, tiny_tokenizer):
    return open_corpus(jsonl, tiny_tokenizer)


def packed(corpus, cfg, **kw):
    kw.setdefault("seed", 5)
    return PackedDataset(corpus, cfg, SEQ, pad_id=3, bos_id=1, **kw)


def batches(loader, n=None):
    out = []
    for b in loader:
        out.append({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
        if n is not None and len(out) == n:
            break
    return out


def rows_of(batch):
    """Per row: (input_ids, roles, doc-boundary pattern); doc numbering is micro-batch relative."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        d = batch["doc_ids"][r]
        starts = torch.ones_like(d, dtype=torch.bool)
        starts[1:] = d[1:] != d[:-1]
        out.append((tuple(batch["input_ids"][r].tolist()), tuple(batch["roles"][r].tolist()), tuple(starts.tolist()), tuple((d == PAD_DOC_ID).tolist())))
    return out


def test_batches_follow_the_contract_and_stats(corpus, gem_cfg):
    ds = packed(corpus, gem_cfg, num_epochs=1)
    stats = ds.epoch_stats(0)
    assert stats.documents_read == 400 and stats.tokens_in == corpus.num_tokens
    assert stats.tokens_out == stats.tokens_in + stats.special_tokens + stats.copied_tokens
    assert stats.chunked_documents == 11 and stats.layouts["split"] > 50
    assert stats.rows == len(ds) and 0 < stats.padding_fraction < 0.1
    loader = GEMDataLoader(ds, micro_batch_size=3)
    all_b = batches(loader)
    assert len(all_b) == len(ds) // 3
    pad = 0
    for b in all_b:
        assert all(v.shape == (3, SEQ) and v.dtype == torch.int64 for v in b.values())
        real = b["doc_ids"][b["doc_ids"] >= 0]
        assert real.min() == 0 and len(torch.unique(real)) == int(real.max()) + 1  # unique in the micro-batch
        assert not torch.isin(b["labels"], torch.tensor(gem_cfg.special_token_ids)).any()
        pad += int((b["doc_ids"] == PAD_DOC_ID).sum())
    # every GEM token that is not padding came out of the plan
    assert sum(int((b["doc_ids"] >= 0).sum()) for b in all_b) + sum(int((ds[i][2] >= 0).sum()) for i in range(3 * len(all_b), len(ds))) == stats.tokens_out


def test_one_rank_equals_union_of_two_ranks(corpus, gem_cfg):
    one = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=2), micro_batch_size=2, global_batch_size=8))
    r0 = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=2), micro_batch_size=2, global_batch_size=8, data_parallel_rank=0, data_parallel_size=2))
    r1 = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=2), micro_batch_size=2, global_batch_size=8, data_parallel_rank=1, data_parallel_size=2))
    assert len(one) == 2 * len(r0) == 2 * len(r1) and len(one) % 4 == 0
    for step in range(len(one) // 4):
        whole = [r for b in one[4 * step : 4 * step + 4] for r in rows_of(b)]
        union = [r for b in r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2] for r in rows_of(b)]
        assert sorted(whole) == sorted(union)
        # Megatron order: micro-step m, rank r takes samples [m*MBS*dp + r*MBS, ...)
        assert rows_of(r1[2 * step])[0] == whole[2]


def test_worker_count_does_not_change_batches(corpus, gem_cfg):
    ref = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=1), micro_batch_size=4), 12)
    two = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=1), micro_batch_size=4, num_workers=2), 12)
    assert len(ref) == len(two) == 12
    for a, b in zip(ref, two):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_exactly_the_remaining_batches(corpus, gem_cfg):
    def loader(**kw):
        return GEMDataLoader(packed(corpus, gem_cfg, num_epochs=3), micro_batch_size=2, global_batch_size=4, **kw)

    full = batches(loader())
    per_epoch = packed(corpus, gem_cfg).samples_in_epoch(0)
    for stop in (3, per_epoch // 2 + 1, len(full) - 2):  # mid-epoch, across the epoch boundary, near the end
        first = loader()
        seen = batches(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        assert state["consumed_samples"] == 2 * stop
        resumed = loader()
        resumed.load_state_dict(state)
        rest = batches(resumed)
        assert len(seen) + len(rest) == len(full)
        for a, b in zip(seen + rest, full):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # resume with another data-parallel size sees the same global rows
    first = loader()
    batches(first, 4)
    r1 = GEMDataLoader(packed(corpus, gem_cfg, num_epochs=3), micro_batch_size=2, global_batch_size=4, data_parallel_rank=1, data_parallel_size=2)
    r1.load_state_dict(first.state_dict())
    assert rows_of(next(iter(r1))) == rows_of(full[5])


def test_resume_state_is_checked(corpus, gem_cfg):
    a = GEMDataLoader(packed(corpus, gem_cfg), micro_batch_size=2)
    batches(a, 1)
    other = GEMDataLoader(packed(corpus, gem_cfg, seed=6), micro_batch_size=2)
    with pytest.raises(ValueError, match="another dataset"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a multiple"):
        GEMDataLoader(packed(corpus, gem_cfg), micro_batch_size=2, global_batch_size=5)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        GEMDataLoader(packed(corpus, gem_cfg), micro_batch_size=4).load_state_dict(a.state_dict())


def test_epochs_reshuffle_and_redraw(corpus, gem_cfg):
    ds = packed(corpus, gem_cfg, num_epochs=2)
    e0, e1 = ds.plan(0), ds.plan(1)
    assert not np.array_equal(e0.pieces.doc, e1.pieces.doc)
    assert sorted(set(e0.pieces.doc.tolist())) == sorted(set(e1.pieces.doc.tolist())) == list(range(len(corpus)))


def test_indexed_and_in_memory_inputs_give_the_same_batches(jsonl, corpus, gem_cfg, tiny_tokenizer, tmp_path):
    prefix, stats = preprocess_to_indexed(jsonl, tiny_tokenizer, str(tmp_path / "c"), workers=2, progress=False)
    assert stats.documents_read == 400
    indexed = open_corpus(prefix)
    a = batches(GEMDataLoader(packed(corpus, gem_cfg, num_epochs=1), micro_batch_size=4))
    b = batches(GEMDataLoader(packed(indexed, gem_cfg, num_epochs=1), micro_batch_size=4, num_workers=2))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_streaming_equals_map_style_and_resumes(jsonl, corpus, gem_cfg, tiny_tokenizer):
    def stream(**kw):
        return StreamingPackedDataset(jsonl, tiny_tokenizer, gem_cfg, SEQ, seed=5, pad_id=3, bos_id=1, num_epochs=2, plan_batch=37, **kw)

    ref = batches(GEMDataLoader(packed(corpus, gem_cfg, shuffle=False, num_epochs=2), micro_batch_size=2, global_batch_size=4))
    ds = stream()
    got = batches(GEMDataLoader(ds, micro_batch_size=2, global_batch_size=4))
    assert len(got) == len(ref)
    for x, y in zip(got, ref):
        assert all(torch.equal(x[k], y[k]) for k in x)
    map_stats = packed(corpus, gem_cfg, shuffle=False).epoch_stats(0)
    s = ds.epoch_stats(0)
    for f in ("documents_read", "tokens_in", "tokens_out", "rows", "padding_tokens", "pieces", "chunked_documents"):
        assert getattr(s, f) == getattr(map_stats, f), f
    first = GEMDataLoader(stream(num_proc=2), micro_batch_size=2, global_batch_size=4)
    seen = batches(first, 6)
    resumed = GEMDataLoader(stream(), micro_batch_size=1, global_batch_size=4, data_parallel_rank=1, data_parallel_size=2)
    resumed.load_state_dict(first.state_dict())
    nxt = next(iter(resumed))
    assert rows_of(nxt)[0] == rows_of(ref[6])[1]  # rank 1 of 2, micro 1: the second row of ref's micro-batch 6
    assert len(seen) == 6


def test_contrastive_batches(corpus, gem_cfg):
    ds = ContrastiveDataset(corpus, gem_cfg, max_text_len=24, seq_length=SEQ, seed=2, num_epochs=1)
    stats = ds.epoch_stats()
    assert stats.truncated_texts > 0
    loader = GEMDataLoader(ds, micro_batch_size=6, global_batch_size=12, data_parallel_rank=1, data_parallel_size=2)
    b = next(iter(loader))
    n = b["num_texts"]
    assert n == 6 and b["input_ids"].shape[1] == SEQ
    docs = b["doc_ids"]
    assert sorted(set(docs.flatten().tolist()) - {PAD_DOC_ID}) == list(range(2 * n))
    k = gem_cfg.num_special_tokens
    for j in range(2 * n):
        sel = docs == j
        ids, roles = b["input_ids"][sel], b["roles"][sel]
        assert len(ids) <= 24
        assert roles[-k:].tolist() == [Role.SPECIAL] * k and ids[-k:].tolist() == gem_cfg.special_token_ids
        assert (roles[:-k] == Role.PREFIX).all()
    for j in range(n):  # the positive view is a subsequence of its anchor's text
        a = b["input_ids"][docs == j][:-k].tolist()
        p = b["input_ids"][docs == n + j][:-k].tolist()
        it = iter(a)
        assert all(t in it for t in p) and len(p) <= len(a)
    # rank 1 of 2 holds texts 6..11 of the global batch
    whole = next(iter(GEMDataLoader(ContrastiveDataset(corpus, gem_cfg, max_text_len=24, seq_length=SEQ, seed=2, num_epochs=1), micro_batch_size=12)))
    anchors_whole = [tuple(whole["input_ids"][whole["doc_ids"] == j].tolist()) for j in range(6, 12)]
    assert anchors_whole == [tuple(b["input_ids"][docs == j].tolist()) for j in range(6)]


def test_huge_document_is_chunked_without_losing_a_token(tiny_tokenizer, gem_cfg):
    text = " ".join(sample_sentences(3000, seed=4))
    corpus = InMemoryCorpus.from_texts([text, "a short one", text[:80]], tiny_tokenizer)
    assert corpus.lengths[0] > 200 * SEQ
    ds = PackedDataset(corpus, gem_cfg, SEQ, seed=1, shuffle=False, num_epochs=1)
    plan = ds.plan(0)
    s = ds.epoch_stats(0)
    assert s.chunked_documents == 1 and s.tokens_out == corpus.num_tokens + s.special_tokens
    # rebuild document 0 from its pieces (chunk order = start order), specials removed
    got = {}
    for r in range(plan.num_rows):
        ids, roles, seg = ds.row(0, r)
        for i, piece in enumerate(range(plan.row_offsets[r], plan.row_offsets[r + 1])):
            if plan.pieces.doc[piece] == 0:
                sel = (seg == i) & (roles != Role.SPECIAL)
                got[int(plan.pieces.start[piece])] = ids[sel]
    assert np.array_equal(np.concatenate([got[k] for k in sorted(got)]), corpus.get(0))


def test_streaming_from_a_hf_iterable_dataset(tiny_tokenizer, gem_cfg):
    import datasets

    texts = sample_sentences(150, seed=21)
    hf = datasets.Dataset.from_dict({"sentence": texts}).to_iterable_dataset()
    stream = StreamingPackedDataset(hf, tiny_tokenizer, gem_cfg, SEQ, seed=2, num_epochs=1, text_field="sentence")
    ref = PackedDataset(InMemoryCorpus.from_texts(texts, tiny_tokenizer), gem_cfg, SEQ, seed=2, shuffle=False, num_epochs=1)
    got = batches(GEMDataLoader(stream, micro_batch_size=2))
    want = batches(GEMDataLoader(ref, micro_batch_size=2))
    assert len(got) == len(want) > 3
    for x, y in zip(got, want):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert stream.epoch_stats(0).documents_read == 150


# ---- supervised pairs for phase 2 ---------------------------------------------------------


def write_pairs(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_pair_batches_hold_query_and_its_own_positive(tmp_path, tiny_tokenizer, gem_cfg):
    from megatron_gem.data import open_pair_corpus

    queries = sample_sentences(40, seed=3)
    positives = [f"answer number {i}: " + s for i, s in enumerate(sample_sentences(40, seed=4))]
    path = write_pairs(tmp_path / "pairs.jsonl", [{"q": q, "p": p} for q, p in zip(queries, positives)])
    pairs = open_pair_corpus(path, tiny_tokenizer, query_field="q", positive_field="p")
    assert len(pairs) == 40 and pairs.stats.documents_read == 40
    ds = ContrastiveDataset(pairs.queries, gem_cfg, positives=pairs.positives, max_text_len=40, seq_length=SEQ, seed=2, num_epochs=1)
    k = gem_cfg.num_special_tokens
    b = next(iter(GEMDataLoader(ds, micro_batch_size=8)))
    n = b["num_texts"]
    docs = b["doc_ids"]
    tokenize = lambda t: tiny_tokenizer(t)["input_ids"][: 40 - k]
    seen = set()
    for j in range(n):
        a_ids, a_roles = b["input_ids"][docs == j], b["roles"][docs == j]
        p_ids, p_roles = b["input_ids"][docs == n + j], b["roles"][docs == n + j]
        for ids, roles in ((a_ids, a_roles), (p_ids, p_roles)):
            assert ids[-k:].tolist() == gem_cfg.special_token_ids and roles[-k:].tolist() == [Role.SPECIAL] * k
            assert (roles[:-k] == Role.PREFIX).all()
        # the anchor is one query, intact; its positive is that query's own positive, intact (no dropout)
        i = next(i for i, q in enumerate(queries) if tokenize(q) == a_ids[:-k].tolist())
        assert p_ids[:-k].tolist() == tokenize(positives[i])
        seen.add(i)
    assert len(seen) == n
    # the pairs take part in the resume fingerprint
    self_supervised = ContrastiveDataset(pairs.queries, gem_cfg, max_text_len=40, seq_length=SEQ, seed=2)
    assert ds.fingerprint() != self_supervised.fingerprint()


def test_bad_pairs_name_their_line_or_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    from megatron_gem.data import DataError, open_pair_corpus

    path = write_pairs(
        tmp_path / "pairs.jsonl",
        [
            {"query": "a good query", "positive": "its positive"},
            {"query": "no positive here"},
            {"query": "empty positive", "positive": "  "},
            {"query": 7, "positive": "a number is no text"},
            "{not json",
            {"query": "another good one", "positive": "and its positive"},
        ],
    )
    with pytest.raises(DataError, match=r"pairs.jsonl:2: no field 'positive'"):
        open_pair_corpus(path, tiny_tokenizer)
    pairs = open_pair_corpus(path, tiny_tokenizer, on_bad="skip")
    assert len(pairs) == 2 and len(pairs.positives) == 2  # never half a pair: the sides stay aligned
    assert dict(pairs.stats.skipped) == {"missing_field": 1, "empty": 1, "not_a_string": 1, "malformed_json": 1}
    assert tiny_tokenizer.decode(pairs.positives.get(1), skip_special_tokens=True).strip() == "and its positive"
    txt = tmp_path / "pairs.txt"
    txt.write_text("plain text has no fields\n")
    with pytest.raises(DataError, match="pairs.txt: pairs need records"):
        open_pair_corpus(str(txt), tiny_tokenizer)


def test_pairs_from_a_hf_dataset_object(tiny_tokenizer):
    import datasets

    from megatron_gem.data import open_pair_corpus

    ds = datasets.Dataset.from_list([{"anchor": f"query {i}", "pos": f"the answer to {i}", "extra": i} for i in range(5)])
    pairs = open_pair_corpus(ds, tiny_tokenizer, query_field="anchor", positive_field="pos")
    assert len(pairs) == 5 and pairs.stats.documents_read == 5
    assert tiny_tokenizer.decode(pairs.queries.get(3), skip_special_tokens=True).strip() == "query 3"
    assert tiny_tokenizer.decode(pairs.positives.get(3), skip_special_tokens=True).strip() == "the answer to 3"
