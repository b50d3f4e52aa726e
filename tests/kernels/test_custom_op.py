"""The Triton kernel as torch.library custom ops (megatron_gem::gem_attention_fwd / _bwd):
FakeTensorMode with CUDA fake tensors (what a memory estimator runs: shapes and dtypes of
outputs and gradients, nothing launched) and torch.compile (CPU interpreter, small shapes)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_gem import gem_attention
from megatron_gem.kernels import build_block_table, placeholder_block_table, triton_gem_attention
from megatron_gem.kernels import gem_attention_triton as kernel_module
from megatron_gem.kernels.reference import make_inputs, random_batch


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any kernel launcher runs (fake tensors must never reach one)."""

    def refuse(*a, **k):
        raise AssertionError("a Triton kernel was launched under FakeTensorMode")

    for name in ("launch_forward", "launch_backward_dkdv", "launch_backward_dq"):
        monkeypatch.setattr(kernel_module, name, refuse)


def _table_args(table):
    t = table
    return (t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices, t.q_num_blocks, t.q_indices, t.full_q_num_blocks, t.full_q_indices)


B, HQ, HKV, L, D = 2, 32, 8, 8192, 128  # a Llama-3-8B layer at 8k tokens: nothing is allocated


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fake_cuda_forward_and_backward_ops(no_launch, dtype, backend):
    """CUDA fake tensors: gem_attention's output, and the registered backward op's dq/dk/dv.

    (On a CPU-only torch, autograd itself aborts the process on fake CUDA tensors that require
    grad, for any op, a matmul included: c10 "not linked with support for cuda devices" in
    getDeviceGuardImpl. The full autograd chain is checked with CPU fake tensors below.)"""
    with FakeTensorMode():
        q = torch.empty(B, HQ, L, D, device="cuda", dtype=dtype)
        k = torch.empty(B, HKV, L, D, device="cuda", dtype=dtype)
        v = torch.empty(B, HKV, L, D, device="cuda", dtype=dtype)
        doc = torch.zeros(B, L, dtype=torch.long, device="cuda")
        out = gem_attention(q, k, v, doc, doc, backend=backend, sliding_window=4096)
        assert (out.shape, out.dtype, out.device.type) == ((B, HQ, L, D), dtype, "cuda")
        table = placeholder_block_table(B, L, block_m=64, block_n=64, device="cuda", sliding_window=4096)
        lse = torch.empty(B, HQ, L, device="cuda", dtype=torch.float32)
        doc32 = doc.int()
        consts = (0.1, 64, 64, False, 4096, kernel_module._pack_cfg(kernel_module.default_launch_config(D, q.device)))
        grads = kernel_module.gem_attention_bwd(out, q, k, v, out, lse, doc32, doc32, *_table_args(table), *consts)
        for g, x in zip(grads, (q, k, v)):
            assert (g.shape, g.dtype, g.device.type) == (x.shape, dtype, "cuda")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_fake_autograd_chain(no_launch, backend):
    """FakeTensorMode, CPU fake tensors with requires_grad: forward, then backward (triton:
    through the op's registered autograd formula; sdpa: the dense path with a placeholder mask),
    gradients of the inputs' shapes and dtypes; nothing launched."""
    with FakeTensorMode():
        q = torch.empty(B, HQ, L, D, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(B, HKV, L, D, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(B, HKV, L, D, dtype=torch.bfloat16, requires_grad=True)
        doc = torch.zeros(B, L, dtype=torch.long)
        out = gem_attention(q, k, v, doc, doc, backend=backend)
        assert (out.shape, out.dtype) == ((B, HQ, L, D), torch.bfloat16)
        out.sum().backward()
        for x in (q, k, v):
            assert (x.grad.shape, x.grad.dtype) == (x.shape, torch.bfloat16)


def test_fake_outputs_keep_the_input_strides(no_launch):
    """q as a transposed view ([B, L, H, D] storage, what HF projections give): the fake output has
    the strides the real launcher's empty_like gives."""
    with FakeTensorMode():
        q = torch.empty(1, 64, 4, 16, device="cuda", dtype=torch.float16).transpose(1, 2)
        k = torch.empty(1, 64, 2, 16, device="cuda", dtype=torch.float16).transpose(1, 2)
        doc = torch.zeros(1, 64, dtype=torch.long, device="cuda")
        out = triton_gem_attention(q, k, k, doc, doc)
        assert out.stride() == torch.empty_like(q).stride()


def test_opcheck_forward_op():
    """torch.library.opcheck: schema, fake implementation against the real op (interpreter),
    autograd registration."""
    doc, role = random_batch(3, 1, 40, 2, styles=("straddle",))
    q, k, v, _ = make_inputs(0, 1, 2, 1, 40, 16, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    t = build_block_table(doc, role, block_m=16, block_n=16)
    lists = (t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices, t.q_num_blocks, t.q_indices, t.full_q_num_blocks, t.full_q_indices)
    cfg = kernel_module._pack_cfg(kernel_module.default_launch_config(16, q.device))
    args = (q, k, v, doc.int(), role.int(), *lists, 0.25, 16, 16, False, 0, cfg)
    torch.library.opcheck(kernel_module.gem_attention_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_under_torch_compile():
    """The op inside a compiled function, fullgraph (no graph break at the kernel): outputs and
    gradients equal the eager call's."""
    doc, role = random_batch(6, 1, 48, 2, styles=("mixed",))
    q, k, v, do = make_inputs(1, 1, 2, 1, 48, 16, torch.float32)
    table = build_block_table(doc, role, block_m=16, block_n=16, sliding_window=20)

    def attend(q, k, v):
        return triton_gem_attention(q, k, v, doc, role, block_table=table, sliding_window=20, scale=0.3)

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(do)
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
