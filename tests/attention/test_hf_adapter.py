"""The transformers adapter runs the GEM rule inside a real HF Llama."""

import numpy as np
import pytest
import torch

from megatron_gem.attention.hf import use_gem_attention
from megatron_gem.gem import PAD_DOC_ID, build_layout, gem_mask, position_ids_from_doc_ids
from megatron_gem.testing import make_tiny_llama


def packed_batch(tok):
    specials = [300, 301]
    docs = [
        ("plain", tok("The cat runs under the tree.")["input_ids"], None),
        ("split", tok("A long sentence about the river and the stone.")["input_ids"], 4),
        ("embed", tok("Two dogs.")["input_ids"], None),
    ]
    ids, roles, doc_ids = [], [], []
    for d, (layout, toks, cut) in enumerate(docs):
        i, r = build_layout(toks, layout, specials, cut=cut)
        ids += i.tolist()
        roles += r.tolist()
        doc_ids += [d] * len(i)
    pad = 3
    batch = {
        "input_ids": torch.tensor([ids + [0] * pad]),
        "roles": torch.tensor([roles + [0] * pad]),
        "doc_ids": torch.tensor([doc_ids + [PAD_DOC_ID] * pad]),
    }
    batch["position_ids"] = position_ids_from_doc_ids(batch["doc_ids"])
    return batch


def test_gem_attention_equals_dense_4d_mask_reference(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    batch = packed_batch(tiny_tokenizer)
    # reference: stock sdpa attention given the dense GEM mask as a prepared 4-D mask
    model.set_attn_implementation("sdpa")
    mask4d = gem_mask(batch["doc_ids"], batch["roles"])[:, None]
    ref = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask4d).logits
    use_gem_attention(model, backend="sdpa")
    got = model(**batch).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_gradients_equal_dense_reference(tiny_tokenizer):
    batch = packed_batch(tiny_tokenizer)
    grads = []
    for impl in ("reference", "gem"):
        model = make_tiny_llama(len(tiny_tokenizer), seed=7)
        if impl == "gem":
            use_gem_attention(model, backend="sdpa")
            out = model(**batch).logits
        else:
            model.set_attn_implementation("sdpa")
            mask4d = gem_mask(batch["doc_ids"], batch["roles"])[:, None]
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask4d).logits
        out.float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_packed_documents_do_not_see_each_other(tiny_tokenizer):
    model = use_gem_attention(make_tiny_llama(len(tiny_tokenizer)), backend="sdpa")
    a = tiny_tokenizer("The cat runs under the tree.")["input_ids"]
    b = tiny_tokenizer("Rain falls.")["input_ids"]
    docs = torch.tensor([[0] * len(a) + [1] * len(b)])
    roles = torch.zeros_like(docs)
    packed = model(torch.tensor([a + b]), position_ids=position_ids_from_doc_ids(docs), doc_ids=docs, roles=roles).logits
    alone = model(torch.tensor([b])).logits  # no doc_ids: plain causal fallback
    assert torch.allclose(packed[0, len(a) :], alone[0], atol=1e-5)


def test_suffix_is_cut_off_from_the_prefix(tiny_tokenizer):
    # In a one-layer model the special token's *input* does not depend on the prefix, so under
    # the GEM mask the suffix outputs cannot change when a prefix token changes; under plain
    # causal attention they do.
    model = use_gem_attention(make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=1), backend="sdpa")
    toks = tiny_tokenizer("A long sentence about the river and the stone.")["input_ids"]
    cut = 5
    ids, roles = build_layout(toks, "split", [300], cut=cut)
    ids, roles = torch.tensor([ids]), torch.tensor([roles.astype(np.int64)])
    docs = torch.zeros_like(ids)
    pos = position_ids_from_doc_ids(docs)
    changed = ids.clone()
    changed[0, 2] = 42  # a prefix token (not the BOS)
    gem = [model(x, position_ids=pos, doc_ids=docs, roles=roles).logits for x in (ids, changed)]
    causal = [model(x, position_ids=pos).logits for x in (ids, changed)]
    suffix = slice(cut + 1, None)
    assert torch.equal(gem[0][0, suffix], gem[1][0, suffix])
    assert not torch.allclose(gem[0][0, cut], gem[1][0, cut])  # the special token does see it
    assert not torch.allclose(causal[0][0, suffix], causal[1][0, suffix])


def test_missing_metadata_and_dropout_are_refused(tiny_tokenizer):
    model = use_gem_attention(make_tiny_llama(len(tiny_tokenizer)), backend="sdpa")
    ids = torch.tensor([tiny_tokenizer("The cat.")["input_ids"]])
    with pytest.raises(ValueError, match="both doc_ids and roles"):
        model(ids, doc_ids=torch.zeros_like(ids))


def test_triton_backend_in_a_model_builds_one_block_table_per_batch(tiny_tokenizer, monkeypatch):
    import megatron_gem.kernels.block_table as bt
    from megatron_gem.attention import dispatch

    calls = []
    real = bt.build_block_table
    monkeypatch.setattr(bt, "build_block_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    import megatron_gem.kernels as kernels_pkg

    monkeypatch.setattr(kernels_pkg, "build_block_table", bt.build_block_table)
    dispatch.block_tables.clear()
    model = make_tiny_llama(len(tiny_tokenizer))
    batch = packed_batch(tiny_tokenizer)
    use_gem_attention(model, backend="sdpa")
    ref = model(**batch).logits
    use_gem_attention(model, backend="triton")
    out = model(**batch).logits
    assert len(calls) == 1, "one table for both layers"
    assert torch.allclose(out, ref, atol=1e-4)
    batch2 = {k: v.clone() for k, v in batch.items()}
    model(**batch2)
    assert len(calls) == 2, "a new batch gets its own table"
    batch2["roles"][0, :] = 0  # in-place edit bumps the version: rebuilt
    model(**batch2)
    assert len(calls) == 3


def test_sdpa_mask_cache_follows_in_place_edits(tiny_tokenizer):
    model = use_gem_attention(make_tiny_llama(len(tiny_tokenizer)), backend="sdpa")
    batch = packed_batch(tiny_tokenizer)
    model(**batch)
    batch["roles"][0, :] = 0  # all plain now: the cached mask of the GEM layout must not be reused
    edited = model(**batch).logits
    fresh = model(**{k: v.clone() for k, v in batch.items()}).logits
    assert torch.equal(edited, fresh)
