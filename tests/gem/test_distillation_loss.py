"""The teacher-distillation loss (gem/losses.py teacher_kl, contrastive_loss, micro_batch_loss)
against a plain loop over rows in fp64: the value, the left-out own positive of self-supervised
views, keys gathered from another rank, the mix with InfoNCE, and gradients (none into the teacher)."""

import math

import pytest
import torch

from megatron_gem.gem import GEMConfig
from megatron_gem.gem.config import GEMConfigError
from megatron_gem.gem.losses import Distillation, contrastive_loss, info_nce, micro_batch_loss, teacher_kl


def _cos(x, y) -> float:
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def hand_kl(a, keys, ta, tkeys, s, tau, left_out=()):
    """mean_i sum_j q_ij log(q_ij / p_ij) with q_i = softmax_j(cos(ta_i, tk_j) / tau) and
    p_i = softmax_j(s cos(a_i, k_j)), the keys (i, j) in ``left_out`` taking no part, written out."""
    total = 0.0
    for i in range(len(a)):
        js = [j for j in range(len(keys)) if (i, j) not in left_out]
        t = [_cos(ta[i], tkeys[j]) / tau for j in js]
        u = [s * _cos(a[i], keys[j]) for j in js]
        zt, zu = sum(math.exp(x) for x in t), sum(math.exp(x) for x in u)
        row = 0.0
        for tj, uj in zip(t, u):
            q, p = math.exp(tj) / zt, math.exp(uj) / zu
            row += q * math.log(q / p)
        total += row
    return total / len(a)


def _batch(n=4, m=2, d=8, dt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return r(n, d), r(n, d), r(m, d), r(n, dt), r(n, dt), r(m, dt)


def test_teacher_kl_matches_a_loop_over_rows():
    a, p, neg, ta, tp, tn = _batch()
    s, tau = 7.0, 0.3
    got = teacher_kl(a, p, ta, tp, torch.tensor(s, dtype=torch.float64), temperature=tau, negatives=neg, teacher_negatives=tn)
    want = hand_kl(a, torch.cat([p, neg]), ta, torch.cat([tp, tn]), s, tau)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want, rel=1e-10)
    # without hard negatives the keys are the positives alone
    got = teacher_kl(a, p, ta, tp, torch.tensor(s, dtype=torch.float64), temperature=tau)
    assert got.item() == pytest.approx(hand_kl(a, p, ta, tp, s, tau), rel=1e-10)
    # KL is 0 exactly when the student's rows are the teacher's: same geometry, scale = 1 / tau
    assert teacher_kl(ta, tp, ta, tp, torch.tensor(1 / tau, dtype=torch.float64), temperature=tau).item() == pytest.approx(0.0, abs=1e-12)


def test_own_positive_of_the_same_text_is_left_out():
    # Anchors 0 and 2 are self-supervised views (the teacher's rows of anchor and positive are one
    # text's); anchors 1 and 3 are pairs of distinct texts. Only (0, 0) and (2, 2) leave the rows.
    a, p, neg, ta, tp, tn = _batch(seed=1)
    tp[0], tp[2] = ta[0], ta[2]
    s, tau = 5.0, 0.1
    got = teacher_kl(a, p, ta, tp, torch.tensor(s, dtype=torch.float64), temperature=tau, negatives=neg, teacher_negatives=tn)
    want = hand_kl(a, torch.cat([p, neg]), ta, torch.cat([tp, tn]), s, tau, left_out={(0, 0), (2, 2)})
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert abs(want - hand_kl(a, torch.cat([p, neg]), ta, torch.cat([tp, tn]), s, tau)) > 1e-3  # it matters


def test_a_row_with_no_key_left_gives_zero_and_no_nan():
    a, p, ta = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4, requires_grad=True), torch.randn(1, 3)
    scale = torch.tensor(9.0, requires_grad=True)
    loss = teacher_kl(a, p, ta, ta.clone(), scale, temperature=0.05)  # one text, its own view: nothing to match
    loss.backward()
    assert loss.item() == 0.0 and not a.grad.any() and not p.grad.any() and scale.grad.item() == 0.0


def test_gathered_keys_of_another_rank():
    # Rank 0 holds anchors 0..1 and rank 1 anchors 2..3; each scores its anchors against every
    # key of both ranks (the other rank's placed after its own: offset 0 on rank 0). The mean of
    # the two ranks' losses is the whole batch's in one process.
    a, p, neg, ta, tp, tn = _batch(n=4, m=0, seed=2)
    tp[1] = ta[1]  # one self-supervised view: its own key leaves its row on rank 0
    s, tau = 6.0, 0.2
    scale = torch.tensor(s, dtype=torch.float64)
    whole = teacher_kl(a, p, ta, tp, scale, temperature=tau).item()
    norm = torch.nn.functional.normalize

    def rank(r):
        own, other = slice(2 * r, 2 * r + 2), slice(2 - 2 * r, 4 - 2 * r)
        seen = []

        def gather(keys):  # student keys (d=8), then teacher keys (d=5): the other rank's rows, normalised
            seen.append(keys.shape[1])
            theirs = norm(p[other] if keys.shape[1] == 8 else tp[other], dim=-1)
            return (torch.cat([keys, theirs]), 0) if r == 0 else (torch.cat([theirs, keys]), 2)

        loss = teacher_kl(a[own], p[own], ta[own], tp[own], scale, temperature=tau, gather_keys=gather)
        assert seen == [8, 5]
        return loss.item()

    assert (rank(0) + rank(1)) / 2 == pytest.approx(whole, rel=1e-12)
    assert whole == pytest.approx(hand_kl(a, p, ta, tp, s, tau, left_out={(1, 1)}), rel=1e-10)


def test_gradients_match_finite_differences_and_skip_the_teacher():
    a, p, neg, ta, tp, tn = _batch(n=3, m=1, seed=3)
    a.requires_grad_(True)
    p.requires_grad_(True)
    ta.requires_grad_(True)  # were the teacher's rows trainable, the loss would still leave them alone
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    tau = 0.25
    loss = teacher_kl(a, p, ta, tp, scale, temperature=tau, negatives=neg, teacher_negatives=tn)
    loss.backward()
    assert ta.grad is None
    keys = lambda pp: torch.cat([pp, neg])  # noqa: E731
    f = lambda aa, pp, s: hand_kl(aa, keys(pp), ta.detach(), torch.cat([tp, tn]), s, tau)  # noqa: E731
    eps = 1e-6
    for tensor in (a, p):
        for idx in [(0, 0), (1, 3), (2, 7)]:
            with torch.no_grad():
                tensor[idx] += eps
                up = f(a.detach(), p.detach(), 4.0)
                tensor[idx] -= 2 * eps
                down = f(a.detach(), p.detach(), 4.0)
                tensor[idx] += eps
            assert tensor.grad[idx].item() == pytest.approx((up - down) / (2 * eps), abs=1e-7)
    fd = (f(a.detach(), p.detach(), 4.0 + eps) - f(a.detach(), p.detach(), 4.0 - eps)) / (2 * eps)
    assert scale.grad.item() == pytest.approx(fd, abs=1e-7)


def test_contrastive_loss_mixes_the_teacher_with_infonce():
    a, p, neg, ta, tp, tn = (t.float() for t in _batch(seed=4))
    scale = torch.tensor(10.0)
    kl = teacher_kl(a, p, ta, tp, scale, temperature=0.05, negatives=neg, teacher_negatives=tn)
    nce = info_nce(a, p, scale, negatives=neg)
    mixed = contrastive_loss(a, p, scale, negatives=neg, teacher=(ta, tp, tn), distill=Distillation(weight=0.3, temperature=0.05))
    assert mixed.item() == pytest.approx(0.3 * kl.item() + 0.7 * nce.item(), rel=1e-6)
    assert contrastive_loss(a, p, scale, negatives=neg, teacher=(ta, tp, tn)).item() == pytest.approx(kl.item(), rel=1e-6)  # weight 1 by default
    assert contrastive_loss(a, p, scale, negatives=neg).item() == pytest.approx(nce.item(), rel=1e-6)  # no teacher: InfoNCE
    calls = []

    def gather(keys):
        calls.append(keys.shape[1])
        return keys, 0

    contrastive_loss(a, p, scale, negatives=neg, gather_keys=gather, teacher=(ta, tp, tn), distill=Distillation(1.0))
    assert calls == [8, 5]  # the teacher alone: InfoNCE is not computed
    calls.clear()
    contrastive_loss(a, p, scale, negatives=neg, gather_keys=gather, teacher=(ta, tp, tn), distill=Distillation(0.5))
    assert calls == [8, 5, 8]


def test_micro_batch_loss_takes_the_teacher_rows_in_the_batch_layout():
    a, p, neg, ta, tp, tn = (t.float() for t in _batch(seed=5))
    emb = torch.cat([a, p, neg]).requires_grad_(True)
    teacher = torch.cat([ta, tp, tn])
    scale = torch.tensor(8.0, requires_grad=True)
    distill = Distillation(weight=0.6, temperature=0.1)
    out = micro_batch_loss(w_ntp=0.0, w_cl=0.5, embeddings=emb, logit_scale=scale, num_texts=4, num_negatives=2, teacher=teacher, distill=distill)
    want = contrastive_loss(a, p, scale, negatives=neg, teacher=(ta, tp, tn), distill=distill)
    assert torch.allclose(out.total, 0.5 * want) and torch.allclose(out.cl, want)
    out.total.backward()
    assert emb.grad.any() and scale.grad.item() != 0.0
    with pytest.raises(ValueError, match="hard negatives"):
        micro_batch_loss(w_cl=1.0, embeddings=emb, logit_scale=scale, num_texts=4, num_negatives=2, teacher=teacher[:-1])


def test_config_checks_the_teacher_settings():
    assert Distillation.from_config(GEMConfig(teacher_weight=0.25, teacher_temperature=0.02)) == Distillation(0.25, 0.02)
    for field, value in (("teacher_weight", 0.0), ("teacher_weight", 1.5), ("teacher_temperature", 0.0), ("teacher_temperature", float("inf"))):
        with pytest.raises(GEMConfigError, match=field):
            GEMConfig(**{field: value})
