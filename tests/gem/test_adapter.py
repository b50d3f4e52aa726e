"""Summary-mode pieces of the method: where the deltas act, that they leave every other row
exactly as the base layer computed it, and the cache-step mask equals the one-row rule."""

import pytest
import torch

from megatron_gem.gem.adapter import LowRankDelta, SummaryAdapter, adapter_active
from megatron_gem.gem.config import GEMConfig
from megatron_gem.gem.layout import build_layout
from megatron_gem.gem.mask import gem_mask, gem_mask_for_queries
from megatron_gem.gem.roles import PAD_DOC_ID, Role
from megatron_gem.gem.tokens import summary_token_ids
from megatron_gem.testing import make_tiny_tokenizer


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
