"""Blends (--data-path): the index, the weights over an epoch, determinism, resume, rank count."""

import json

import numpy as np
import pytest
import torch

from megatron_gem.data import (
    BlendedDataset,
    ContrastiveDataset,
    CorpusBlend,
    DataError,
    InMemoryCorpus,
    PackedDataset,
    blending_indices,
    largest_remainder_counts,
    make_ntp_loader,
    reference_blending_indices,
)
from megatron_gem.gem import GEMConfig

SEQ = 32
VOCAB = 200


@pytest.fixture(scope="module")
def cfg():
    return GEMConfig(num_special_tokens=2, special_token_ids=[VOCAB, VOCAB + 1], p_raw=0.5, prefix_dropout=0.2)


def corpus(n_docs, seed, offset):
    # Each source's tokens lie in its own range, so a row tells which source it came from.
    rng = np.random.default_rng(seed)
    return InMemoryCorpus.from_token_arrays([rng.integers(offset, offset + 50, int(rng.integers(3, 40))) for _ in range(n_docs)])


@pytest.fixture(scope="module")
def sources():
    return [corpus(60, 1, 2), corpus(25, 2, 52), corpus(140, 3, 102)]


def blend(sources, cfg, weights=None, seed=7):
    return make_ntp_loader(CorpusBlend(sources, ["a", "b", "c"], weights), cfg, SEQ, micro_batch_size=2, seed=seed).dataset


def source_of(row) -> int:
    ids = row[0][row[2] >= 0]
    ids = ids[ids < VOCAB]  # the GEM special tokens are common to all sources
    (which,) = np.unique((ids - 2) // 50)
    return int(which)


@pytest.mark.parametrize("sizes", [[5, 7, 3], [1, 1], [100, 1, 37, 4], [9], [0, 4, 2], [3, 0]])
def test_compiled_index_equals_the_reference(sizes):
    src, idx = blending_indices(sizes)
    ref_src, ref_idx = reference_blending_indices(sizes)
    np.testing.assert_array_equal(src, ref_src)
    np.testing.assert_array_equal(idx, ref_idx)
    assert np.bincount(src, minlength=len(sizes)).tolist() == list(sizes)
    for s in range(len(sizes)):  # each source's samples come in order 0, 1, 2, ...
        assert idx[src == s].tolist() == list(range(sizes[s]))


def test_largest_remainder_counts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(int(rng.integers(1, 7))) + 1e-3
        total = int(rng.integers(0, 500))
        c = largest_remainder_counts(w, total)
        assert c.sum() == total and (c >= 0).all() and np.abs(c - w / w.sum() * total).max() < 1
    assert largest_remainder_counts([1, 1, 1], 4).tolist() == [2, 1, 1]


def test_weights_are_honoured_over_an_epoch(sources, cfg):
    weights = [0.5, 0.3, 0.2]
    ds = blend(sources, cfg, weights)
    n = ds.epoch_size
    assert n == sum(PackedDataset(c, cfg, SEQ, seed=7).samples_in_epoch(0) for c in sources)
    for epoch in range(3):
        got = [ds.source_sample(epoch * n + i) for i in range(n)]
        counts = np.bincount([s for s, _ in got], minlength=3)
        assert counts.tolist() == largest_remainder_counts(weights, n).tolist()
        assert np.abs(counts - np.array(weights) * n).max() < 1
        for s in range(3):  # blend epoch e reads source s's samples e*c .. (e+1)*c - 1, in order
            assert [k for t, k in got if t == s] == list(range(epoch * counts[s], (epoch + 1) * counts[s]))
    for i in (0, 1, 5, n - 1, n, 2 * n + 3):  # a blend sample is that source's row
        s, k = ds.source_sample(i)
        row = ds[i]
        assert source_of(row) == s
        for a, b in zip(row, ds.datasets[s][k]):
            np.testing.assert_array_equal(a, b)
    counts = largest_remainder_counts(weights, n)
    assert f"[blend]   b (weight 0.3): {counts[1]} samples per blend epoch" in ds.report() and f"{n} samples per blend epoch (weighted)" in ds.report()


def test_a_finite_blend_ends(sources, cfg):
    ds = make_ntp_loader(CorpusBlend(sources, ["a", "b", "c"]), cfg, SEQ, micro_batch_size=2, seed=7, num_epochs=2).dataset
    assert len(ds) == 2 * ds.epoch_size and ds.locate(2 * ds.epoch_size - 1) == (1, ds.epoch_size - 1)
    with pytest.raises(IndexError):
        ds.locate(2 * ds.epoch_size)


def test_unweighted_is_in_proportion_to_size_every_row_once(sources, cfg):
    ds = blend(sources, cfg)
    sizes = [d.samples_in_epoch(0) for d in ds.datasets]
    got = [ds.source_sample(i) for i in range(ds.epoch_size)]
    for s in range(3):
        assert sorted(k for t, k in got if t == s) == list(range(sizes[s]))


def test_tiny_weight_is_refused(sources, cfg):
    with pytest.raises(DataError, match="b: weight 1e-06 gives it 0 of the"):
        blend(sources, cfg, [1, 1e-6, 1])


def test_the_blend_is_deterministic(sources, cfg):
    a, b = blend(sources, cfg, [2, 1, 1]), blend(sources, cfg, [2, 1, 1])
    for i in range(0, 3 * a.epoch_size, 7):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    c = blend(sources, cfg, [2, 1, 1], seed=8)
    assert any(not np.array_equal(a[i][0], c[i][0]) for i in range(20))


def batches(loader, n):
    out = []
    for b in loader:
        out.append({k: v.clone() for k, v in b.items()})
        if len(out) == n:
            break
    return out


def loader(sources, cfg, **kw):
    return make_ntp_loader(CorpusBlend(sources, ["a", "b", "c"], [0.2, 0.5, 0.3]), cfg, SEQ, micro_batch_size=2, global_batch_size=4, seed=7, **kw)


def test_resume_mid_epoch_equals_uninterrupted(sources, cfg):
    n = loader(sources, cfg).dataset.epoch_size
    steps = n // 2 + 5  # 2 micro-batches of 2 per step: past the first blend epoch
    straight = batches(loader(sources, cfg), steps)
    first = loader(sources, cfg)
    head = batches(first, n // 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    assert state["consumed_samples"] == 2 * (n // 4) and len(state["blend_sources"]) == 3
    resumed = loader(sources, cfg)
    resumed.load_state_dict(state)
    tail = batches(resumed, steps - len(head))
    assert len(head) + len(tail) == len(straight)
    for a, b in zip(straight, head + tail):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_data_parallel_ranks_and_workers_see_the_single_rank_sequence(sources, cfg):
    one = batches(loader(sources, cfg, data_parallel_rank=0, data_parallel_size=1), 40)
    workers = batches(loader(sources, cfg, data_parallel_rank=0, data_parallel_size=1, num_workers=2), 40)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, workers) for k in a)
    r0 = batches(loader(sources, cfg, data_parallel_rank=0, data_parallel_size=2), 20)
    r1 = batches(loader(sources, cfg, data_parallel_rank=1, data_parallel_size=2), 20)
    for m in range(20):  # micro-step m of dp=2 = micro-batches 2m (rank 0) and 2m+1 (rank 1) of dp=1
        for k in one[0]:
            assert torch.equal(one[2 * m][k], r0[m][k]) and torch.equal(one[2 * m + 1][k], r1[m][k]), k


def test_a_state_of_another_blend_is_refused(sources, cfg):
    state = loader(sources, cfg).state_dict()
    other = make_ntp_loader(CorpusBlend(sources, ["a", "b", "c"], [0.3, 0.5, 0.2]), cfg, SEQ, micro_batch_size=2, global_batch_size=4, seed=7)
    with pytest.raises(ValueError, match="another dataset"):
        other.load_state_dict(state)


def test_the_blend_is_a_corpus_of_all_sources(sources, cfg):
    c = CorpusBlend(sources, ["a", "b", "c"], [1, 1, 1])
    assert len(c) == 225 and c.num_tokens == sum(s.num_tokens for s in sources)
    assert c.stats.documents_read == 225
    for i, (s, j) in {0: (0, 0), 59: (0, 59), 60: (1, 0), 85: (2, 0), 224: (2, 139)}.items():
        np.testing.assert_array_equal(c.get(i), sources[s].get(j))
        np.testing.assert_array_equal(c.get_slice(i, 1, 2), sources[s].get(j)[1:3])
    np.testing.assert_array_equal(c.first_tokens(), np.concatenate([s.first_tokens() for s in sources]))
    texts = ContrastiveDataset(c, cfg, max_text_len=24, seq_length=SEQ)  # phase 2's self-supervised texts: every document
    assert texts.samples_in_epoch(0) == 225
    with pytest.raises(ValueError, match="positive numbers"):
        CorpusBlend(sources, ["a", "b", "c"], [1, 0, 1])


def test_one_loader_for_blends_and_plain_corpora(sources, cfg):
    assert isinstance(loader(sources, cfg).dataset, BlendedDataset)
    assert isinstance(make_ntp_loader(sources[0], cfg, SEQ, micro_batch_size=2).dataset, PackedDataset)
