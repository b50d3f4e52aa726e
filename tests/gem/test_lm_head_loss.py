"""The chunked LM-head cross-entropy (gem/lm_head_loss.py) against the full-logits reference:
outputs and gradients in fp32, bf16 bounded by the bf16 reference's own error, padding rows,
ignored targets, and the vocabulary-parallel statistics (shards in threads exchanging through
an in-process all-reduce; the gloo run is tests/mcore/test_convert.py's TP layouts)."""

import threading

import pytest
import torch

from megatron_gem.gem.lm_head_loss import lm_head_token_losses, reference_lm_head_token_losses
from megatron_gem.gem.roles import IGNORE_INDEX


def problem(T=37, H=24, V=61, seed=0, dtype=torch.float32, real=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, real or V, (T,), generator=g)
    labels[::4] = IGNORE_INDEX
    upstream = torch.rand(T, generator=g) + 0.5  # a per-token gradient, not only the sum's ones
    return hidden, weight, labels, upstream


def value_and_grads(fn, hidden, weight, labels, upstream, **kw):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fn(h, w, labels, **kw)
    gh, gw = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), [h, w])
    return out.detach(), gh, gw


def assert_close(got, want, tol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert float((g.double() - w.double()).abs().max()) <= tol * max(1.0, float(w.double().abs().max())), float((g.double() - w.double()).abs().max())


# (chunk_tokens, chunk_vocab): one block; blocks that do and do not divide 37 tokens / 61 rows.
BLOCKS = [(None, None), (37, 61), (5, 7), (4, 16), (1, 20), (37, 1), (64, 128)]


@pytest.mark.parametrize("chunk_tokens,chunk_vocab", BLOCKS)
@pytest.mark.parametrize("vocab_limit", [None, 55])
def test_fp32_equals_full_logits_reference(chunk_tokens, chunk_vocab, vocab_limit):
    hidden, weight, labels, up = problem(real=vocab_limit)
    got = value_and_grads(lm_head_token_losses, hidden, weight, labels, up, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, vocab_limit=vocab_limit)
    want = value_and_grads(reference_lm_head_token_losses, hidden, weight, labels, up, vocab_limit=vocab_limit)
    assert got[0].dtype == torch.float32 and got[0].shape == labels.shape
    assert_close(got, want, 1e-5)
    assert torch.all(got[0][labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("chunk_tokens,chunk_vocab", [(None, None), (5, 7), (16, 16)])
def test_bf16_error_is_the_bf16_references_own(chunk_tokens, chunk_vocab):
    # Against an fp64 oracle, the chunked bf16 result may err at most twice as much as the
    # full-logits bf16 computation (which rounds the logits GEMM and its gradient GEMMs once).
    hidden, weight, labels, up = problem(T=96, H=64, V=200, seed=3)
    oracle = value_and_grads(reference_lm_head_token_losses, hidden.double(), weight.double(), labels, up)
    ref = value_and_grads(reference_lm_head_token_losses, hidden.bfloat16(), weight.bfloat16(), labels, up)
    got = value_and_grads(lm_head_token_losses, hidden.bfloat16(), weight.bfloat16(), labels, up, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for name, g, r, o in zip(("loss", "grad hidden", "grad weight"), got, ref, oracle):
        ref_err = float((r.double() - o).abs().max())
        err = float((g.double() - o).abs().max())
        assert ref_err > 0 and err <= 2 * ref_err, (name, err, ref_err)


def test_padding_rows_never_win_and_get_no_gradient():
    # Rows 50.. are padding: huge weights that would take every softmax if they counted.
    hidden, weight, labels, up = problem(V=64, real=50)
    weight[50:] = 100.0 * hidden[0]
    got = value_and_grads(lm_head_token_losses, hidden, weight, labels, up, chunk_vocab=16, vocab_limit=50)
    unpadded = value_and_grads(lm_head_token_losses, hidden, weight[:50].clone(), labels, up, chunk_vocab=16)
    assert_close(got[:2], unpadded[:2], 1e-6)
    assert torch.equal(got[2][50:], torch.zeros_like(got[2][50:]))
    assert_close((got[2][:50],), (unpadded[2],), 1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels, up = problem()
    labels[:] = IGNORE_INDEX
    out, gh, gw = value_and_grads(lm_head_token_losses, hidden, weight, labels, up, chunk_tokens=8)
    assert not out.any() and not gh.any() and not gw.any()


def test_leading_dims_and_bad_shapes():
    hidden, weight, labels, up = problem(T=24)
    got = lm_head_token_losses(hidden.view(2, 3, 4, -1), weight, labels.view(2, 3, 4), chunk_tokens=5)
    assert got.shape == (2, 3, 4)
    assert torch.allclose(got.view(-1), reference_lm_head_token_losses(hidden, weight, labels), atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        lm_head_token_losses(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="LM head weight"):
        lm_head_token_losses(hidden, weight[:, :-1], labels)


class ThreadGroup:
    """An all-reduce among ``size`` threads (one per vocabulary shard)."""

    def __init__(self, size):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size)

    def member(self, rank):
        def all_reduce(t, op):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            self.barrier.wait()
            return stacked.amax(0) if op == "max" else stacked.sum(0)

        return all_reduce


@pytest.mark.parametrize("shards,chunk_vocab", [(2, None), (3, 5)])
def test_vocabulary_parallel_shards_equal_one_process(shards, chunk_vocab):
    # 66 rows in `shards` equal shards, ids >= 40 padding (with 3 shards of 22 the last one is
    # all padding). Each shard's grad_hidden is partial: their sum is the gradient (what
    # megatron's copy-to-tensor-parallel-region backward all-reduces).
    V, real = 66, 40
    hidden, weight, labels, up = problem(V=V, real=real, seed=5)
    part = V // shards
    group, results, errors = ThreadGroup(shards), [None] * shards, []

    def run(r):
        try:
            results[r] = value_and_grads(
                lm_head_token_losses,
                hidden,
                weight[r * part : (r + 1) * part],
                labels,
                up,
                vocab_start=r * part,
                vocab_limit=real,
                all_reduce=group.member(r),
                chunk_tokens=8,
                chunk_vocab=chunk_vocab,
            )
        except BaseException as e:  # surfaced below; a failing thread must not hang the others
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    want = value_and_grads(reference_lm_head_token_losses, hidden, weight, labels, up, vocab_limit=real)
    for out, _, _ in results:
        assert_close((out,), (want[0],), 1e-5)
    grad_h = sum(r[1] for r in results)
    grad_w = torch.cat([r[2] for r in results])
    assert_close((grad_h, grad_w), want[1:], 1e-5)
