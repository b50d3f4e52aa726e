"""Summary-mode pieces of the method: where the deltas act, that they leave every other row
exactly as the base layer computed it, and the cache-step mask equals the one-row rule."""

import pytest
import torch

from megatron_gem.gem.adapter import ActiveRows, LowRankDelta, SummaryAdapter, adapter_active
from megatron_gem.gem.config import GEMConfig
from megatron_gem.gem.layout import build_layout
from megatron_gem.gem.mask import gem_mask, gem_mask_for_queries
from megatron_gem.gem.roles import PAD_DOC_ID, Role
from megatron_gem.gem.tokens import summary_token_ids
from megatron_gem.testing import make_tiny_tokenizer
from tests.host_syncs import HostSyncCounter


def _row():
    ids, roles = build_layout(list(range(10, 20)), "split", [1, 2], cut=4)
    roles = torch.as_tensor(roles, dtype=torch.long)[None]
    docs = torch.zeros_like(roles)
    docs[0, -2:] = PAD_DOC_ID
    return roles, docs


def test_active_positions_are_summary_tokens_never_prefix_or_padding():
    roles, docs = _row()
    special = adapter_active(roles, docs, "special")
    assert torch.equal(special, (roles == Role.SPECIAL) & (docs >= 0))
    both = adapter_active(roles, docs, "special+suffix")
    assert torch.equal(both, (roles != Role.PREFIX) & (docs >= 0))
    assert not both[0, :4].any() and not both[0, -2:].any()
    with pytest.raises(ValueError, match="adapter positions"):
        adapter_active(roles, docs, "everywhere")


def test_delta_touches_only_active_rows_and_trains():
    torch.manual_seed(0)
    d = LowRankDelta(8, 6, rank=2, alpha=4.0)
    x = torch.randn(3, 5, 8)
    base = torch.nn.Linear(8, 6)(x)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2] = mask[2, 4] = True
    assert torch.equal(d(x, base, mask), base)  # B starts at zero: a fresh adapter is the base model
    torch.nn.init.normal_(d.lora_B)
    out = d(x, base, mask)
    assert torch.equal(out[~mask], base[~mask])
    ref = base[mask] + (x[mask] @ d.lora_A.t() @ d.lora_B.t()) * 2.0
    torch.testing.assert_close(out[mask], ref)
    out.square().sum().backward()
    assert d.lora_A.grad.abs().sum() > 0 and d.lora_B.grad.abs().sum() > 0
    assert d(x, base, None) is base and d(x, base, torch.zeros_like(mask)) is base
    with pytest.raises(ValueError, match="does not match"):
        d(x, base, mask[:, :2])


class _PassThrough(torch.autograd.Function):
    """Returns its input as is, like megatron-core's tensor-parallel all-reduce after a
    RowParallelLinear: autograd makes the output a view it forbids writing into."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _masked_reference(d, x, base, mask):
    """The obviously correct delta: boolean-mask rows on a copy of the base output."""
    out = base.clone()
    out[mask] = out[mask] + d.delta(x[mask]).to(out.dtype)
    return out


@pytest.mark.parametrize("base_kind", ["fresh", "custom_function_view"])
def test_delta_by_index_equals_the_masked_reference_without_a_sync(base_kind):
    torch.manual_seed(0)
    d = LowRankDelta(8, 6, rank=2, alpha=4.0)
    torch.nn.init.normal_(d.lora_B)
    lin = torch.nn.Linear(8, 6, bias=False)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = mask[2, 0] = mask[2, 4] = True
    rows = ActiveRows.of(mask)
    assert rows.count == 4 and rows.shape == mask.shape
    x0 = torch.randn(3, 5, 8)
    weight = torch.randn(3, 5, 6)

    def run(fast):
        d.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        base = lin(x) if base_kind == "fresh" else _PassThrough.apply(lin(x))
        kept = base.detach().clone()
        with HostSyncCounter() as syncs:
            out = d(x, base, rows, in_place=True) if fast else _masked_reference(d, x, base, mask)
        (out * weight).sum().backward()
        return out, base, kept, syncs, (x.grad, d.lora_A.grad, d.lora_B.grad)

    out, base, kept, syncs, grads = run(True)
    ref, _, _, ref_syncs, ref_grads = run(False)
    assert syncs.total == 0 and ref_syncs.total == 3  # the masked path: gather, gather, scatter
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[~mask], kept[~mask])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    if base_kind == "fresh":  # written into the base output: no copy of it
        assert out is base
    else:  # autograd forbids writing into this view: a new tensor, the base left as it was
        assert out is not base and torch.equal(base.detach(), kept)


def test_rows_are_found_once_per_batch_and_follow_in_place_writes():
    a = SummaryAdapter({"model.layers.0.self_attn.q_proj": (8, 8)}, rank=4, alpha=8.0)
    roles, docs = _row()
    want = adapter_active(roles, docs).reshape(-1).nonzero().flatten()
    with HostSyncCounter() as syncs:
        first = a.rows_for(roles, docs)
        again = [a.rows_for(roles, docs), a.rows_for(roles.detach(), docs[:])]  # views, recompute's detached copies
    assert syncs.total == 1 and all(r is first for r in again)
    assert torch.equal(first.index, want) and first.shape == roles.shape
    roles[0, 0] = Role.SPECIAL  # an in-place write (a reused batch buffer): found again
    moved = a.rows_for(roles, docs)
    assert moved is not first and moved.count == first.count + 1 and int(moved.index[0]) == 0
    assert a.rows_for(roles.clone(), docs).index.tolist() == moved.index.tolist()  # equal contents, another tensor
    a.set_positions(None, None)
    assert a.active.rows is None


def test_rows_of_inference_tensors_are_kept_for_one_forward_only():
    # Inference tensors keep no version counter: an in-place write between two forwards (a
    # reused buffer) must still be seen, so their rows are forgotten at the next forward.
    a = SummaryAdapter({"model.layers.0.self_attn.q_proj": (8, 8)}, rank=4, alpha=8.0)
    with torch.inference_mode():
        roles, docs = (t.clone() for t in _row())
        first = a.rows_for(roles, docs)
        assert a.rows_for(roles, docs) is first  # the other layers of the same forward
        a.active.begin_forward()
        roles[0, 0] = Role.SPECIAL
        moved = a.rows_for(roles, docs)
    assert moved.count == first.count + 1 and int(moved.index[0]) == 0


def test_summary_adapter_names_and_config_checks():
    a = SummaryAdapter({"model.layers.0.self_attn.q_proj": (8, 8)}, rank=4, alpha=8.0)
    assert a.delta_for("model.layers.0.self_attn.q_proj").lora_A.shape == (4, 8)
    with pytest.raises(ValueError, match="adapter_targets"):
        SummaryAdapter({}, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="train_mode"):
        GEMConfig(train_mode="frozen")
    with pytest.raises(ValueError, match="summary_tokens"):
        GEMConfig(num_special_tokens=2, summary_tokens=["<unk>"])


def test_summary_tokens_are_existing_ids_and_named_when_missing():
    tok = make_tiny_tokenizer()
    cfg = GEMConfig(train_mode="summary", summary_tokens=["<unk>"])
    assert summary_token_ids(tok, cfg) == [tok.unk_token_id] == cfg.special_token_ids
    with pytest.raises(ValueError, match="--gem-summary-tokens"):
        summary_token_ids(tok, GEMConfig(train_mode="summary"))  # the tiny tokenizer has no unused special token
    with pytest.raises(ValueError, match="not in the tokenizer"):
        summary_token_ids(tok, GEMConfig(train_mode="summary", summary_tokens=["<|nope|>"]))


def test_cache_step_mask_equals_the_row_rule():
    # Two packed documents (embed layout, K=2) and padding; queries = the special tokens only,
    # keys = the whole row: the rows of gem_mask at those queries.
    a, ra = build_layout([5, 6, 7], "embed", [1, 2])
    b, rb = build_layout([8, 9], "embed", [1, 2])
    roles = torch.as_tensor(list(ra) + list(rb) + [0, 0], dtype=torch.long)[None]
    docs = torch.as_tensor([0] * len(a) + [1] * len(b) + [PAD_DOC_ID] * 2)[None]
    full = gem_mask(docs, roles)
    q = (roles[0] == Role.SPECIAL).nonzero().flatten()
    idx = torch.arange(roles.shape[1])[None]
    sub = gem_mask_for_queries(q[None], docs[:, q], roles[:, q], idx, docs, roles)
    assert torch.equal(sub, full[:, q])
