"""megatron_gem.gem_attention: the sdpa, flex and triton backends execute one rule.

sdpa is the reference (dense gem_mask); flex runs forward only (no FlexAttention backward on
CPU); triton runs forward and backward in the interpreter.
"""

import warnings

import pytest
import torch

from megatron_gem import gem_attention
from megatron_gem.kernels.reference import random_batch


def _inputs(B, Hq, Hkv, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_forward_all_backends_agree(Hq, Hkv, bos):
    doc, role = random_batch(Hq * 10 + Hkv, 2, 83, 2, styles=("straddle", "mixed"))
    q, k, v = _inputs(2, Hq, Hkv, 83, 32)
    outs = {}
    for backend in ("sdpa", "flex", "triton"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # flex's "called without torch.compile"
            outs[backend] = gem_attention(q, k, v, doc, role, backend=backend, suffix_sees_bos=bos)
    assert outs["sdpa"].shape == (2, Hq, 83, 32)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"], outs["sdpa"], rtol=1e-5, atol=1e-5)
    # auto picks sdpa on CPU
    torch.testing.assert_close(gem_attention(q, k, v, doc, role, suffix_sees_bos=bos), outs["sdpa"], rtol=0, atol=0)


@pytest.mark.parametrize("bos", [False, True])
def test_gradients_triton_vs_sdpa(bos):
    doc, role = random_batch(5, 2, 75, 5, styles=("mixed", "tiny"))
    base = _inputs(2, 4, 2, 75, 32, seed=1)
    do = torch.randn(2, 4, 75, 32, generator=torch.Generator().manual_seed(2))
    grads = {}
    for backend in ("sdpa", "triton"):
        q, k, v = (x.clone().requires_grad_() for x in base)
        out = gem_attention(q, k, v, doc, role, backend=backend, suffix_sees_bos=bos, scale=0.2)
        out.backward(do)
        grads[backend] = (out.detach(), q.grad, k.grad, v.grad)
    for name, t, s in zip(("out", "dq", "dk", "dv"), grads["triton"], grads["sdpa"]):
        torch.testing.assert_close(t, s, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
