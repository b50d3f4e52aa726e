import math

import pytest
import torch

from megatron_gem.gem import IGNORE_INDEX, GEMConfig
from megatron_gem.gem.losses import LogitScale, info_nce, loss_weights, micro_batch_loss, ntp_loss, ntp_loss_sum, split_embeddings, zero_touch


def hand_info_nce(a, p, s):
    """-1/n sum_i log( exp(s cos(a_i,p_i)) / sum_j exp(s cos(a_i,p_j)) ), written out."""
    n = len(a)
    total = 0.0
    for i in range(n):
        cos = [float(torch.dot(a[i], p[j]) / (a[i].norm() * p[j].norm())) for j in range(n)]
        total += -(s * cos[i] - math.log(sum(math.exp(s * c) for c in cos)))
    return total / n


def test_info_nce_value_matches_hand_computation():
    torch.manual_seed(0)
    a, p = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    got = info_nce(a, p, torch.tensor(20.0))
    assert got.item() == pytest.approx(hand_info_nce(a, p, 20.0), rel=1e-5)


def test_info_nce_gradient_matches_finite_differences():
    torch.manual_seed(1)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    # info_nce computes in float32; compare against the float64 hand formula with a looser bound
    loss = info_nce(a, p, scale)
    loss.backward()
    eps = 1e-6
    for tensor, grad in ((a, a.grad), (p, p.grad)):
        for idx in [(0, 0), (2, 3), (3, 5)]:
            with torch.no_grad():
                tensor[idx] += eps
                up = hand_info_nce(a.detach(), p.detach(), 7.0)
                tensor[idx] -= 2 * eps
                down = hand_info_nce(a.detach(), p.detach(), 7.0)
                tensor[idx] += eps
            assert grad[idx].item() == pytest.approx((up - down) / (2 * eps), abs=2e-4)
    up, down = hand_info_nce(a.detach(), p.detach(), 7.0 + eps), hand_info_nce(a.detach(), p.detach(), 7.0 - eps)
    assert scale.grad.item() == pytest.approx((up - down) / (2 * eps), abs=2e-4)


def test_info_nce_gathered_negatives():
    torch.manual_seed(2)
    a, p = torch.randn(3, 8), torch.randn(3, 8)
    other = torch.randn(4, 8)  # positives held by another rank, placed before ours

    def gather(keys):
        return torch.cat([torch.nn.functional.normalize(other, dim=-1), keys]), 4

    got = info_nce(a, p, torch.tensor(10.0), gather_keys=gather)
    # same as a local batch of 7 anchors whose first 4 are "other rank" rows, scored on ours
    sims = 10.0 * torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(torch.cat([other, p]), dim=-1).T
    expected = torch.nn.functional.cross_entropy(sims, torch.arange(3) + 4)
    assert torch.allclose(got, expected, atol=1e-6)


def test_info_nce_with_hard_negatives_matches_hand_computation():
    # Hard negatives are extra keys of every anchor (MultipleNegativesRankingLoss): anchor i is
    # scored against all positives and all hard negatives, its own positive is the target.
    torch.manual_seed(4)
    a, p, neg = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    s = 15.0
    keys = torch.cat([p, neg])
    total = 0.0
    for i in range(3):
        cos = [float(torch.dot(a[i], keys[j]) / (a[i].norm() * keys[j].norm())) for j in range(7)]
        total += -(s * cos[i] - math.log(sum(math.exp(s * c) for c in cos)))
    got = info_nce(a, p, torch.tensor(s), negatives=neg)
    assert got.item() == pytest.approx(total / 3, rel=1e-5)
    assert got.item() > info_nce(a, p, torch.tensor(s)).item()  # more keys, harder task
    # an empty set of negatives is the plain loss; with a gather, the local keys are [p; neg]
    assert info_nce(a, p, torch.tensor(s), negatives=torch.zeros(0, 8)).item() == pytest.approx(info_nce(a, p, torch.tensor(s)).item())
    seen = []

    def gather(keys):
        seen.append(keys.shape[0])
        return keys, 0

    info_nce(a, p, torch.tensor(s), negatives=neg, gather_keys=gather)
    assert seen == [7]
    with pytest.raises(ValueError, match="negatives"):
        info_nce(a, p, torch.tensor(s), negatives=torch.zeros(2, 5))


def test_logit_scale_init_and_clamp():
    ls = LogitScale.from_config(GEMConfig(logit_scale_init=20.0, logit_scale_max=100.0))
    assert ls().item() == pytest.approx(20.0)
    with torch.no_grad():
        ls.log_scale.fill_(10.0)
    assert ls().item() == pytest.approx(100.0)
    with torch.no_grad():
        ls.log_scale.fill_(-3.0)
    assert ls().item() == pytest.approx(1.0)
    ls().backward()  # clamped: no gradient pushes it further out
    assert ls.log_scale.grad.item() == 0.0
    with pytest.raises(ValueError):
        LogitScale(init=200.0, max_scale=100.0)


def test_ntp_loss_is_a_token_mean_under_packing_padding_and_accumulation():
    torch.manual_seed(3)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, 3:] = IGNORE_INDEX  # padding / masked
    labels[2, :5] = IGNORE_INDEX
    full_mean = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    # two micro-batches of 2 rows, each divided by the global count, summed
    _, count = ntp_loss_sum(logits, labels)
    accumulated = ntp_loss(logits[:2], labels[:2], count) + ntp_loss(logits[2:], labels[2:], count)
    assert torch.allclose(accumulated, full_mean, atol=1e-6)
    # the naive mean of per-micro-batch means would differ here
    naive = 0.5 * (ntp_loss(logits[:2], labels[:2]) + ntp_loss(logits[2:], labels[2:]))
    assert not torch.allclose(naive, full_mean, atol=1e-4)
    # a batch with nothing to train gives 0, not NaN
    assert ntp_loss(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


def test_loss_weights_schedule():
    cfg = GEMConfig(contrastive_from_step=100, alpha=1.0)
    assert loss_weights(0, cfg) == (1.0, 0.0) and loss_weights(99, cfg) == (1.0, 0.0)
    assert loss_weights(100, cfg) == (0.0, 1.0)
    assert loss_weights(150, GEMConfig(contrastive_from_step=100, alpha=0.75)) == pytest.approx((0.25, 0.75))


def test_zero_touch_gives_every_input_a_zero_gradient_and_never_nan():
    w = torch.randn(5, 3, requires_grad=True)
    logits = torch.full((2, 4), float("-inf"))
    logits[0, 0] = float("nan")
    logits.requires_grad_(True)
    scale = torch.tensor([2.0], requires_grad=True)
    empty = torch.zeros(0, 3, requires_grad=True)
    t = zero_touch(w @ torch.ones(3), logits, None, scale, empty)
    assert t.dtype == torch.float32 and t.shape == () and t.item() == 0.0
    t.backward()
    for x in (w, logits, scale, empty):
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    assert zero_touch().item() == 0.0


def test_micro_batch_loss_composes_the_phases():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 9)
    labels = torch.randint(0, 9, (2, 5))
    labels[1, 2:] = IGNORE_INDEX
    token_losses = torch.nn.functional.cross_entropy(logits.view(-1, 9), labels.view(-1), reduction="none", ignore_index=IGNORE_INDEX).view(2, 5)
    token_losses[labels == IGNORE_INDEX] = 7.0  # whatever a loss puts there, ignored targets do not count
    total = torch.nn.functional.cross_entropy(logits.view(-1, 9), labels.view(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    count = int((labels != IGNORE_INDEX).sum())
    emb = torch.randn(7, 4, requires_grad=True)  # 3 anchors, 3 positives, 1 hard negative
    scale = torch.tensor(5.0, requires_grad=True)
    cl = info_nce(emb[:3], emb[3:6], scale, negatives=emb[6:])

    scaled = micro_batch_loss(w_ntp=0.5, token_losses=token_losses, labels=labels, ntp_scale=0.25)  # train.py: the sum times a scale
    assert torch.allclose(scaled.total, 0.25 * total) and torch.allclose(scaled.ntp_sum, total) and int(scaled.ntp_tokens) == count
    both = micro_batch_loss(w_ntp=0.5, w_cl=0.5, token_losses=token_losses, labels=labels, embeddings=emb, logit_scale=scale, num_texts=3, num_negatives=1)
    assert torch.allclose(both.total, 0.5 * total / count + 0.5 * cl) and torch.allclose(both.cl, cl) and torch.allclose(both.ntp, total / count)
    given = micro_batch_loss(w_ntp=0.25, ntp=torch.tensor(2.0), w_cl=0.75, embeddings=emb, logit_scale=scale, num_texts=3, num_negatives=1)
    assert torch.allclose(given.total, 0.25 * 2.0 + 0.75 * cl)

    # A term with weight 0 is not computed; its inputs are touched: zero gradients, not None.
    head = torch.randn(9, 4, requires_grad=True)
    head_losses = (torch.randn(2, 5, 4) @ head.T)[..., 0]  # [2, 5], computed through the head
    only_cl = micro_batch_loss(w_ntp=0.0, w_cl=1.0, token_losses=head_losses, labels=labels, embeddings=emb, logit_scale=scale, num_texts=3, num_negatives=1)
    assert only_cl.ntp_sum is None and torch.allclose(only_cl.total, cl)
    only_cl.total.backward()
    assert head.grad is not None and not head.grad.any() and emb.grad.any()
    emb.grad, scale.grad = None, None
    only_ntp = micro_batch_loss(token_losses=token_losses, labels=labels, embeddings=emb, logit_scale=scale)  # w_cl = 0
    assert only_ntp.cl is None and torch.allclose(only_ntp.total, total / count)
    only_ntp.total.backward()
    assert not emb.grad.any() and scale.grad.item() == 0.0
    with pytest.raises(ValueError, match="hard negatives"):
        split_embeddings(emb, 3, 0)
