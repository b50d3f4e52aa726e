"""GradCache (training/grad_cache.py) and hard negatives, in one process on the tiny model: the
chunked loss and parameter gradients equal the unchunked ones (fp32), with and without hard
negatives, with and without a distillation teacher (which never receives a gradient); the
pieces' contracts."""

import json

import pytest
import torch

from megatron_gem.data import ContrastiveDataset, GEMDataLoader, open_pair_corpus
from megatron_gem.data.datasets import chunk_spans
from megatron_gem.gem import GEMConfig
from megatron_gem.hf.model import GEMModel, prepare_gem_lm
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences
from megatron_gem.training.grad_cache import RngSnapshot, embedding_grads, split_embeddings, surrogate_loss
from megatron_gem.training.step import contrastive_micro_loss
from megatron_gem.training.step_plan import cached_backward


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """12 pair records: 0, 1 or 2 hard negatives (string or list), one record without the field."""
    path = tmp_path_factory.mktemp("gc") / "pairs.jsonl"
    texts = sample_sentences(40, seed=4)
    with open(path, "w") as f:
        for i in range(12):
            rec = {"query": f"what does item {i} say?", "positive": texts[i]}
            if i % 3 == 1:
                rec["negative"] = texts[12 + i]
            elif i % 3 == 2:
                rec["negative"] = [texts[24 + i], texts[(i + 5) % 12]]
            f.write(json.dumps(rec) + "\n")
    return path


def _model(seed=3):
    tok = make_tiny_tokenizer()
    cfg = GEMConfig(num_special_tokens=2)
    lm = make_tiny_llama(len(tok), seed=seed)
    prepare_gem_lm(lm, tok, cfg, backend="auto", gradient_checkpointing=False)
    return tok, cfg, GEMModel(lm, cfg)


def _batch(tok, cfg, pairs_path, *, chunk, negatives=True, texts=False):
    corpus = open_pair_corpus(str(pairs_path), tok, negative_field="negative" if negatives else None, keep_texts=texts)
    ds = ContrastiveDataset(
        corpus.queries,
        cfg,
        positives=corpus.positives,
        negatives=corpus.negatives,
        max_text_len=24,
        seq_length=64,
        pad_id=tok.pad_token_id,
        shuffle=False,
        chunk_size=chunk,
        texts=corpus.texts,
    )
    batch = next(iter(GEMDataLoader(ds, micro_batch_size=8, data_parallel_rank=0, data_parallel_size=1)))
    batch["dataset"] = ds  # for the tests' own checks; the models ignore other keys
    return corpus, batch


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("negatives", [True, False])
def test_chunked_loss_and_gradients_equal_unchunked(pairs, negatives):
    tok, cfg, model = _model()
    _, whole = _batch(tok, cfg, pairs, chunk=None, negatives=negatives)
    _, chunked = _batch(tok, cfg, pairs, chunk=3, negatives=negatives)
    assert "chunks" not in whole and [c["num_texts"] for c in chunked["chunks"]] == [3, 3, 2]
    assert chunked["num_negatives"] == whole["num_negatives"] == (7 if negatives else 0)  # records 0..7: 0+1+2+0+1+2+0+1

    ref = contrastive_micro_loss(model, whole, weight=0.7)
    ref.loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    backwards = []

    def backward(loss, last):
        backwards.append(last)
        loss.backward()

    got_loss = cached_backward(lambda ch: model(ch, "embed"), backward, chunked, weight=0.7)
    got = _grads(model)
    assert backwards == [False, False, True]
    assert got_loss == pytest.approx(ref.cl_loss, rel=1e-6)
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        # fp32 sums in another order (other rows, other packing): differences of a few 1e-6 of the largest entry
        scale = float(g.abs().max())
        assert float((got[name] - g).abs().max()) <= 1e-5 * scale, (name, float((got[name] - g).abs().max()), scale)
    assert want["logit_scale.log_scale"].abs().item() > 0  # the scale's gradient is carried too


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    from megatron_gem.distill import Teacher

    return Teacher.from_pretrained(tiny_teacher)


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_chunked_distillation_equals_unchunked_and_the_teacher_gets_no_gradient(pairs, teacher, weight):
    """The teacher's term (alone, and mixed with InfoNCE) through GradCache's two passes gives
    the unchunked loss and parameter gradients; the teacher's rows are the same texts' as the
    student's, in the same order; the teacher's parameters never see a gradient."""
    from megatron_gem.distill import embed_batch
    from megatron_gem.gem.losses import Distillation

    tok, cfg, model = _model()
    _, whole = _batch(tok, cfg, pairs, chunk=None, texts=True)
    _, chunked = _batch(tok, cfg, pairs, chunk=3, texts=True)
    embed_batch(teacher, whole)
    embed_batch(teacher, chunked)
    n, m = whole["num_texts"], whole["num_negatives"]
    assert whole["teacher"].shape == (2 * n + m, 32) and not whole["teacher"].requires_grad
    assert torch.equal(whole["teacher"], teacher.embed(whole["texts"]))
    records = [json.loads(line) for line in open(pairs)]

    def raw(a, b):  # the documents of records a..b-1 as the data set lays them out: anchors, positives, hard negatives
        negs = [t for r in records[a:b] for t in ([r["negative"]] if isinstance(r.get("negative"), str) else r.get("negative", []))]
        return [r["query"] for r in records[a:b]] + [r["positive"] for r in records[a:b]] + negs

    assert whole["texts"] == raw(0, n)
    assert [c["texts"] for c in chunked["chunks"]] == [raw(0, 3), raw(3, 6), raw(6, 8)]
    for c in chunked["chunks"]:  # one teacher call for the micro-batch; a row depends on its call only through padding
        torch.testing.assert_close(c["teacher"], teacher.embed(c["texts"]), atol=1e-6, rtol=0)
    distill = Distillation(weight=weight, temperature=0.05)

    ref = contrastive_micro_loss(model, whole, weight=0.7, distill=distill)
    plain = contrastive_micro_loss(model, {k: v for k, v in whole.items() if k != "teacher"}, weight=0.7)
    assert abs(ref.cl_loss - plain.cl_loss) > 1e-4  # the teacher's term is in the loss
    ref.loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got_loss = cached_backward(lambda ch: model(ch, "embed"), lambda loss, last: loss.backward(), chunked, weight=0.7, distill=distill)
    got = _grads(model)
    assert got_loss == pytest.approx(ref.cl_loss, rel=1e-5)
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        scale = float(g.abs().max())
        assert float((got[name] - g).abs().max()) <= 1e-5 * scale, (name, float((got[name] - g).abs().max()), scale)
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not any(p is q for p in params for q in model.parameters())
    assert not any("teacher" in k for k in model.state_dict())


def test_extra_loss_rides_with_the_first_chunk(pairs):
    tok, cfg, model = _model()
    _, chunked = _batch(tok, cfg, pairs, chunk=4)
    seen = []

    def extra():
        seen.append(len(seen))
        return 0.0 * model.logit_scale()

    cached_backward(lambda ch: model(ch, "embed"), lambda loss, last: loss.backward(), chunked, weight=1.0, extra=extra)
    assert seen == [0]


def test_embedding_grads_match_autograd_of_the_concatenated_batch():
    torch.manual_seed(0)
    e1, e2 = torch.randn(2 * 2 + 1, 6), torch.randn(2 * 3 + 0, 6)  # chunk 1: 2 anchors + 1 negative; chunk 2: 3 anchors
    scale = torch.tensor(9.0)
    cached = embedding_grads([e1, e2], [(2, 1), (3, 0)], scale, weight=2.0)
    a = torch.cat([e1[:2], e2[:3]]).requires_grad_()
    p = torch.cat([e1[2:4], e2[3:6]]).requires_grad_()
    n = e1[4:].clone().requires_grad_()
    s = scale.clone().requires_grad_()
    from megatron_gem.gem.losses import info_nce

    loss = info_nce(a, p, s, negatives=n)
    (2.0 * loss).backward()
    assert cached.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert torch.allclose(cached.grads[0], torch.cat([a.grad[:2], p.grad[:2], n.grad]), atol=1e-7)
    assert torch.allclose(cached.grads[1], torch.cat([a.grad[2:], p.grad[2:]]), atol=1e-7)
    assert cached.scale_grad.item() == pytest.approx(s.grad.item(), rel=1e-6)
    # the surrogate's gradient with respect to what it multiplies is the cached gradient
    emb, sc = e1.clone().requires_grad_(), scale.clone().requires_grad_()
    surrogate_loss(emb, cached.grads[0], sc, cached.scale_grad).backward()
    assert torch.equal(emb.grad, cached.grads[0]) and sc.grad.item() == pytest.approx(cached.scale_grad.item())


def test_chunk_plan_and_split():
    assert chunk_spans(8, None) == chunk_spans(8, 8) == chunk_spans(8, 20) == [(0, 8)]
    assert chunk_spans(8, 3) == [(0, 3), (3, 6), (6, 8)]
    with pytest.raises(ValueError, match=">= 1"):
        chunk_spans(8, 0)
    with pytest.raises(ValueError, match="expected 2 x 3 texts \\+ 1 hard negatives"):
        split_embeddings(torch.zeros(6, 2), 3, 1)


def test_rng_snapshot_repeats_a_random_forward():
    # The models have no dropout; a forward that draws random numbers still repeats exactly.
    snap = RngSnapshot()
    first = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
    snap.restore()
    assert torch.equal(first, torch.nn.functional.dropout(torch.ones(64), 0.5, training=True))


def test_negatives_are_read_laid_out_and_counted(pairs):
    tok, cfg, _ = _model()
    corpus, batch = _batch(tok, cfg, pairs, chunk=None)
    assert corpus.negatives.counts.tolist() == [0, 1, 2] * 4
    assert corpus.stats.hard_negatives == 12 and corpus.stats.records_without_negatives == 4
    assert "[pairs] hard negatives: 12 (records without any: 4, empty strings dropped: 0)" in corpus.stats.report("pairs")
    n, m = batch["num_texts"], batch["num_negatives"]
    docs = set(batch["doc_ids"][batch["doc_ids"] >= 0].tolist())
    assert docs == set(range(2 * n + m))  # anchors, positives, then the hard negatives
    # texts over max_text_len - K = 22 tokens are truncated and counted, hard negatives included
    ds = batch["dataset"]
    lengths = [*corpus.queries.lengths, *corpus.positives.lengths, *corpus.negatives.corpus.lengths]
    assert ds.epoch_stats().truncated_texts == sum(int(x) > 22 for x in lengths)
