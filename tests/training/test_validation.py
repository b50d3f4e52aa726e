"""The validation metric against hand computations, Megatron's --split (disjoint, deterministic,
Megatron's bounds), and the flags' checks. The runs through train.py (both engines, several
processes) are in test_deepspeed_engine.py and test_megatron_engine.py."""

import math

import numpy as np
import pytest
import torch

from megatron_gem.data import InMemoryCorpus, PackedDataset
from megatron_gem.data.split import CorpusView, parse_split, split_bounds, split_corpus
from megatron_gem.gem.config import GEMConfig
from megatron_gem.gem.roles import IGNORE_INDEX, Role
from megatron_gem.training.args import ArgumentError, job_config, parse_args
from megatron_gem.training.validation import SUMS, contrastive_sums, gem_layout_tokens, ntp_sums, validation_record

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def test_ntp_sums_split_plain_and_gem_layout_tokens_by_hand():
    # Row 0: a plain document (0) then a GEM document (1: prefix, special, suffix), then padding.
    # Row 1: a GEM document whose doc id (0) equals row 0's plain one: layouts are per row.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1, -1, -1]])
    roles = torch.tensor([[P, P, P, P, S, X, X, P], [P, S, X, X, P, P, P, P]])
    labels = torch.tensor(
        [[5, 6, IGNORE_INDEX, 7, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX], [9, IGNORE_INDEX, 4, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    )
    losses = torch.arange(16, dtype=torch.float32).view(2, 8) / 4 + 0.5
    gem = gem_layout_tokens(doc_ids, roles)
    assert gem.tolist() == [[False] * 3 + [True] * 4 + [False], [True] * 4 + [False] * 4]
    # plain targets: (0,0) (0,1) (1,4); GEM-layout targets: (0,3) (0,5) (1,0) (1,2)
    L = losses.tolist()
    plain = L[0][0] + L[0][1] + L[1][4]
    gem_sum = L[0][3] + L[0][5] + L[1][0] + L[1][2]
    out = ntp_sums(losses, {"labels": labels, "doc_ids": doc_ids, "roles": roles}).tolist()
    assert out == pytest.approx([plain, 3, gem_sum, 4], rel=1e-12)


def _hand_info_nce(anchors, keys, scale, offset):
    """Per anchor: -log softmax(scale * cos)[own], and whether the own key scores highest."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    losses, correct = [], []
    for i, a in enumerate(anchors):
        s = [scale * sum(x * y for x, y in zip(unit(a), unit(k))) for k in keys]
        own = offset + i
        losses.append(math.log(sum(math.exp(v) for v in s)) - s[own])
        correct.append(max(range(len(s)), key=lambda j: s[j]) == own)
    return losses, correct


def test_contrastive_sums_by_hand_one_rank_and_split_over_two():
    g = torch.Generator().manual_seed(3)
    anchors = torch.randn(4, 5, generator=g, dtype=torch.float64)
    positives = anchors + 0.9 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    positives[2] = -anchors[2]  # anchor 2's own positive scores lowest: a top-1 miss
    losses, correct = _hand_info_nce(anchors.tolist(), positives.tolist(), 7.0, 0)
    assert not correct[2] and sum(correct) >= 1
    out = contrastive_sums(anchors, positives, 7.0).tolist()
    assert out == pytest.approx([sum(losses), sum(correct), 4], rel=1e-6)
    # Two data-parallel ranks of 2 anchors each, every positive gathered as a key: the summed
    # figures of the two ranks are the one-rank figures (what the all-reduce adds up).
    halves = []
    for r in range(2):

        def gather(local, r=r):  # the local keys arrive normalised; every rank's, in rank order
            assert torch.allclose(local, torch.nn.functional.normalize(positives[2 * r : 2 * r + 2].float(), dim=-1))
            return torch.nn.functional.normalize(positives.float(), dim=-1), 2 * r

        halves.append(contrastive_sums(anchors[2 * r : 2 * r + 2], positives[2 * r : 2 * r + 2], 7.0, gather_keys=gather))
    assert (halves[0] + halves[1]).tolist() == pytest.approx(out, rel=1e-6)


def test_validation_record_is_sums_over_counts():
    sums = torch.tensor([10.0, 4.0, 3.0, 2.0, 6.0, 3.0, 8.0], dtype=torch.float64)
    rec = validation_record(7, sums)
    assert len(SUMS) == 7
    assert rec["step"] == 7 and rec["valid_ntp_loss"] == 13 / 6 and rec["valid_ntp_loss_plain"] == 2.5 and rec["valid_ntp_loss_gem"] == 1.5
    assert rec["valid_cl_loss"] == 0.75 and rec["valid_cl_top1"] == 3 / 8 and rec["valid_cl_texts"] == 8
    empty = validation_record(1, torch.zeros(7, dtype=torch.float64))
    assert empty["valid_ntp_loss"] is None and empty["valid_ntp_loss_gem"] is None and empty["valid_cl_top1"] is None


@pytest.mark.parametrize(
    "text, weights",
    [("949,50,1", (0.949, 0.05, 0.001)), ("90/10/0", (0.9, 0.1, 0.0)), ("1,1", (0.5, 0.5, 0.0)), ("969, 30, 1", (0.969, 0.03, 0.001))],
)
def test_parse_split(text, weights):
    assert parse_split(text) == pytest.approx(weights)


@pytest.mark.parametrize("text", ["", "1,2,3,4", "a,b", "-1,2", "0,0,0"])
def test_parse_split_refuses(text):
    with pytest.raises(ValueError):
        parse_split(text)


def test_split_bounds_are_megatrons():
    # Megatron-LM's _get_split_indices: rounded cumulative sizes, overshoot off every bound.
    assert split_bounds(parse_split("949,50,1"), 1000) == [0, 949, 999, 1000]
    assert split_bounds(parse_split("969,30,1"), 10) == [0, 10, 10, 10]
    # 10 / 3 rounds to 3 each: bounds 0, 3, 6, 9 undershoot by 1, which moves every later bound
    assert split_bounds(parse_split("1,1,1"), 10) == [0, 4, 7, 10]
    assert split_bounds(parse_split("50,50,0"), 7)[-1] == 7


def test_split_corpus_parts_are_disjoint_cover_and_deterministic():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 300, size=int(n)) for n in rng.integers(5, 40, size=57)]
    corpus = InMemoryCorpus.from_token_arrays(docs)
    parts = split_corpus(corpus, parse_split("80,15,5"))
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [45, 9, 3]  # 45.6, 8.55, 2.85 round to 46, 9, 3: one over, taken off the later bounds
    seen = [(p.start, p.stop) for p in parts.values()]
    assert seen == [(0, 45), (45, 54), (54, 57)]  # contiguous, disjoint, covering, in file order
    for p in parts.values():
        for i in range(len(p)):
            assert np.array_equal(p.get(i), docs[p.start + i])
            assert np.array_equal(p.get_slice(i, 2, 3), docs[p.start + i][2:5])
        assert p.first_tokens().tolist() == [int(d[0]) for d in docs[p.start : p.stop]]
    again = split_corpus(InMemoryCorpus.from_token_arrays(docs), parse_split("80,15,5"))
    assert all(again[k].fingerprint() == parts[k].fingerprint() for k in parts)
    assert len({p.fingerprint() for p in parts.values()}) == 3
    # a view packs like a corpus of its own documents
    own = InMemoryCorpus.from_token_arrays(docs[45:54])
    a, b = (
        PackedDataset(parts["valid"], GEMConfig(p_raw=0.5, special_token_ids=[999]), 64, seed=1),
        PackedDataset(own, GEMConfig(p_raw=0.5, special_token_ids=[999]), 64, seed=1),
    )
    assert len(a.plan(0).row_offsets) == len(b.plan(0).row_offsets)
    for r in range(a.plan(0).num_rows):
        assert all(np.array_equal(x, y) for x, y in zip(a.row(0, r), b.row(0, r)))
    with pytest.raises(ValueError):
        CorpusView(corpus, 50, 60)


def _args(tiny_inputs, tmp_path, *extra):
    return [
        "--model",
        tiny_inputs["model"],
        "--data",
        tiny_inputs["data"],
        "--save",
        str(tmp_path / "out"),
        "--train-iters",
        "4",
        "--gem-contrastive-from-step",
        "2",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "1,2,3,4"], "--split"),
        (["--split", "0,1"], "the train weight is 0"),
        (["--split", "9,1", "--valid-data", "README.md"], "--split and --valid-data"),
        (["--eval-interval", "5"], "--eval-interval needs validation documents"),
        (["--split", "100,0,0", "--eval-interval", "5"], "--eval-interval needs validation documents"),
        (["--valid-contrastive-data", "README.md"], "--valid-contrastive-data needs validation documents"),
        (["--split", "9,1", "--eval-interval", "0"], "--eval-interval must be >= 1"),
        (["--split", "9,1", "--eval-iters", "-1"], "--eval-iters must be >= 0"),
        (["--valid-data", "/no/such.jsonl"], "--valid-data /no/such.jsonl: no such file"),
        (["--wandb-exp-name", "x"], "--wandb-exp-name is given without --wandb-project"),
        (["--wandb-project", "p"], "--wandb-project needs --wandb-exp-name"),
    ],
)
def test_bad_validation_and_wandb_flags(tiny_inputs, tmp_path, extra, message):
    with pytest.raises(ArgumentError, match=message):
        job_config(parse_args(_args(tiny_inputs, tmp_path, *extra)), world_size=1)


def test_validation_flags_reach_the_job_config(tiny_inputs, tmp_path):
    job = job_config(parse_args(_args(tiny_inputs, tmp_path, "--split", "949,50,1", "--eval-iters", "3")), world_size=1)
    v = job.validation
    assert v.split == pytest.approx((0.949, 0.05, 0.001)) and v.eval_interval == 1000 and v.eval_iters == 3 and job.validates
    off = job_config(parse_args(_args(tiny_inputs, tmp_path, "--split", "949,50,1", "--eval-iters", "0")), world_size=1)
    assert not off.validates and off.validation.split is not None  # the split still holds documents out
    assert not job_config(parse_args(_args(tiny_inputs, tmp_path)), world_size=1).validates
