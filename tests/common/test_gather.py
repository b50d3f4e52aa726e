"""The cross-rank key gather (common/distributed.py) with different key counts per rank (hard
negatives): 2 gloo processes give the single-process loss and exact gradients."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.common.gather_worker import NEGATIVES, data
from tests.launch import run_torchrun


@pytest.mark.multiprocess
def test_gather_with_unequal_key_counts_equals_one_process(tmp_path):
    run_torchrun(["tests/common/gather_worker.py", str(tmp_path)], nproc=2, timeout=120)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    anchors, positives, negatives = (t.clone().requires_grad_() for t in data())
    s = torch.tensor(8.0, requires_grad=True)
    n0 = NEGATIVES[0]
    # every rank's keys in rank order: [p_0; neg_0; p_1; neg_1], normalised
    keys = F.normalize(torch.cat([positives[:2], negatives[:n0], positives[2:], negatives[n0:]]), dim=-1)
    a = F.normalize(anchors, dim=-1)
    offsets = (0, 2 + n0)
    losses = [F.cross_entropy(s * a[2 * r : 2 * r + 2] @ keys.T, torch.arange(2) + offsets[r]) for r in range(2)]
    sum(losses).backward()  # each rank's gradient is that of the sum of all ranks' losses

    for r in range(2):
        assert got[r]["loss"] == pytest.approx(float(losses[r].detach()), rel=1e-6)
        assert torch.allclose(torch.tensor(got[r]["a"]), anchors.grad[2 * r : 2 * r + 2], atol=1e-6)
        assert torch.allclose(torch.tensor(got[r]["p"]), positives.grad[2 * r : 2 * r + 2], atol=1e-6)
        rows = slice(0, n0) if r == 0 else slice(n0, None)
        assert torch.allclose(torch.tensor(got[r]["n"]), negatives.grad[rows], atol=1e-6)
    # the scale's gradient is per rank (data parallelism sums/averages it afterwards)
    assert got[0]["s"] + got[1]["s"] == pytest.approx(float(s.grad), rel=1e-5)
