"""Worker of test_gather.py (torchrun, gloo): InfoNCE with hard negatives whose count differs
between the two ranks, keys gathered with make_gather_keys; writes this rank's loss and
gradients as JSON to argv[1]/rank{R}.json."""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_gem.common.distributed import make_gather_keys
from megatron_gem.gem.losses import info_nce

NEGATIVES = (1, 3)  # rank 0 holds one hard negative, rank 1 three


def data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(sum(NEGATIVES), 6, generator=g)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    r = dist.get_rank()
    anchors, positives, negatives = data()
    a = anchors[2 * r : 2 * r + 2].clone().requires_grad_()
    p = positives[2 * r : 2 * r + 2].clone().requires_grad_()
    n = negatives[sum(NEGATIVES[:r]) : sum(NEGATIVES[: r + 1])].clone().requires_grad_()
    s = torch.tensor(8.0, requires_grad=True)
    loss = info_nce(a, p, s, negatives=n, gather_keys=make_gather_keys())
    loss.backward()
    out = {"loss": float(loss.detach()), "a": a.grad.tolist(), "p": p.grad.tolist(), "n": n.grad.tolist(), "s": float(s.grad)}
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
