"""enable_gem / disable_gem and GEMDataCollator on a tiny model (no training)."""

import numpy as np
import pytest
import torch

from megatron_gem.gem import IGNORE_INDEX, PAD_DOC_ID, GEMConfig, Role, next_token_labels
from megatron_gem.gem.losses import ntp_loss
from megatron_gem.integrations import GEMDataCollator, disable_gem, enable_gem, is_gem_enabled
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences


def _gem_model(k=1, **cfg):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    config = GEMConfig(num_special_tokens=k, **cfg)
    enable_gem(model, tok, config, backend="sdpa")
    return model, tok, config


def test_enable_gem_tokens_attention_and_inverse():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    old_rows = model.get_input_embeddings().weight.detach().clone()
    config = GEMConfig(num_special_tokens=2)
    assert enable_gem(model, tok, config, backend="sdpa") is model
    ids = config.special_token_ids
    assert len(ids) == 2 and model.gem_config is config and is_gem_enabled(model)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == old_rows.shape[0] + 2
    for w in (emb, model.get_output_embeddings().weight):  # untied head: both get the mean row
        assert torch.allclose(w[ids[0]], w[: old_rows.shape[0]].mean(0), atol=1e-6)
    # Idempotent: a second call (e.g. on a GEM checkpoint) adds nothing.
    enable_gem(model, tok, GEMConfig(num_special_tokens=2), backend="sdpa")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # The GEM forward with doc_ids/roles differs from causal on a split layout; without them it is causal.
    x = torch.tensor([tok("The cat sees the dog under the old tree")["input_ids"]])
    split = torch.cat([x[:, :4], torch.tensor([ids]), x[:, 4:]], dim=1)
    roles = torch.tensor([[0] * 4 + [1, 1] + [2] * (x.shape[1] - 4)])
    doc = torch.zeros_like(roles)
    with torch.no_grad():
        gem = model(split, doc_ids=doc, roles=roles).logits
        causal = model(split).logits
        disable_gem(model)
        assert model.config._attn_implementation == "sdpa" and model.config.use_cache
        assert not hasattr(model.config, "gem_attention_backend")
        sdpa = model(split).logits
    assert torch.allclose(causal, sdpa, atol=1e-5)
    assert not torch.allclose(gem[:, -1], sdpa[:, -1], atol=1e-3)


def test_generate_never_emits_special_tokens():
    model, tok, config = _gem_model(k=2)
    with torch.no_grad():  # make the GEM tokens the most likely next tokens everywhere
        model.get_output_embeddings().weight[config.special_token_ids] *= 0
        model.lm_head.weight[config.special_token_ids] += 50 * model.model.norm.weight.sign()
    prompt = torch.tensor([tok("The cat")["input_ids"]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert not set(out[0, prompt.shape[1] :].tolist()) & set(config.special_token_ids)
    suppressed = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = None  # the control: without suppression they are emitted
    out_raw = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert set(out_raw[0, prompt.shape[1] :].tolist()) & set(config.special_token_ids)
    model.generation_config.suppress_tokens = suppressed
    # The GEM attention's causal fallback and the exported sdpa model generate the same text.
    with_gem = model.generate(prompt, max_new_tokens=6, do_sample=False)
    disable_gem(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), with_gem)


@pytest.mark.parametrize("packing", [False, True])
def test_labels_after_hf_shift_are_the_gem_labels(packing):
    model, tok, config = _gem_model(k=2, p_raw=0.3)
    feats = [{"input_ids": tok(t)["input_ids"]} for t in sample_sentences(10, seed=4)]
    batch = GEMDataCollator.from_tokenizer(tok, config, packing=packing, max_length=96, seed=3)(feats)
    assert (batch["roles"] == Role.SPECIAL).any() and (batch["doc_ids"] == PAD_DOC_ID).any()
    gem = next_token_labels(batch["input_ids"], batch["roles"], batch["doc_ids"])  # aligned labels
    assert torch.equal(batch["labels"][:, 1:], gem[:, :-1]) and (batch["labels"][:, 0] == IGNORE_INDEX).all()
    if packing:
        assert batch["input_ids"].shape[0] < len(feats)  # several documents share a row
        real = batch["doc_ids"][batch["doc_ids"] >= 0]
        assert sorted(set(real.tolist())) == list(range(len(feats)))  # unique doc ids in the batch
    # The HF model's own (shifting) loss on these labels is the GEM NTP loss.
    with torch.no_grad():
        out = model(**batch)
        assert torch.allclose(out.loss, ntp_loss(out.logits, gem), atol=1e-5)


@pytest.mark.parametrize("layout,packing", [("split", False), ("split", True), ("reconstruct", False)])
def test_pipeline_label_mask_survives_the_insertion(layout, packing):
    _, tok, config = _gem_model(k=2, p_raw=0.0, layout=layout)
    feats, masked = [], []
    for i, t in enumerate(sample_sentences(6, seed=7, min_words=10)):
        ids = tok(t)["input_ids"]
        labels = list(ids)
        m = 3 + i  # the "prompt": the pipeline masked its first m tokens
        labels[:m] = [IGNORE_INDEX] * m
        feats.append({"input_ids": ids, "labels": labels})
        masked.append(m)
    collator = GEMDataCollator.from_tokenizer(tok, config, packing=packing, max_length=256)
    b = collator(feats)
    assert collator.stats[layout] == len(feats)
    for r in range(b["input_ids"].shape[0]):
        for d in sorted(set(b["doc_ids"][r].tolist()) - {PAD_DOC_ID}):
            sel = b["doc_ids"][r] == d
            ids, roles, labels = b["input_ids"][r][sel], b["roles"][r][sel], b["labels"][r][sel]
            orig, m = feats[d]["input_ids"] if packing else feats[r]["input_ids"], masked[d] if packing else masked[r]
            text = ids[roles != Role.SPECIAL].tolist()
            copies = [orig] if layout == "split" else [orig, orig[1:]]  # reconstruct: BOS not repeated
            assert text == sum(copies, [])  # tokens untouched, specials only inserted
            assert (labels[roles == Role.SPECIAL] == IGNORE_INDEX).all() and labels[0] == IGNORE_INDEX
            lab_text = labels[roles != Role.SPECIAL].tolist()
            expect = []
            for c, copy in enumerate(copies):
                offset = 0 if c == 0 else 1  # the second copy starts at original token 1
                expect += [IGNORE_INDEX if (j + offset) < m else tok_id for j, tok_id in enumerate(copy)]
            expect[0] = IGNORE_INDEX
            assert lab_text == expect


def test_chat_template_tokens_survive():
    _, tok, config = _gem_model(k=1, p_raw=0.0)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    msgs = [{"role": "user", "content": "Why does the cat sleep?"}, {"role": "assistant", "content": "Because the sun is warm."}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    b = GEMDataCollator.from_tokenizer(tok, config)([{"input_ids": ids, "labels": labels}])
    keep = b["roles"][0] != Role.SPECIAL
    assert tok.decode(b["input_ids"][0][keep]) == tok.decode(ids)
    trained = b["labels"][0][keep]
    assert (trained[: len(prompt)] == IGNORE_INDEX).all()
    assert trained[len(prompt) :].tolist() == ids[len(prompt) :]


def test_layout_draws_are_seeded_and_follow_p_raw():
    _, tok, config = _gem_model(k=1, p_raw=0.8)
    feats = [{"input_ids": tok(t)["input_ids"]} for t in sample_sentences(400, seed=2, min_words=12)]
    a = GEMDataCollator.from_tokenizer(tok, config, seed=5)
    b = GEMDataCollator.from_tokenizer(tok, config, seed=5)
    c = GEMDataCollator.from_tokenizer(tok, config, seed=6)
    ba, bb, bc = a(feats), b(feats), c(feats)
    assert torch.equal(ba["input_ids"], bb["input_ids"]) and not torch.equal(ba["input_ids"], bc["input_ids"])
    frac_plain = a.stats["plain"] / len(feats)
    assert 0.74 < frac_plain < 0.86, frac_plain
    plain = GEMDataCollator.from_tokenizer(tok, GEMConfig(p_raw=1.0, special_token_ids=config.special_token_ids))(feats[:8])
    assert not (plain["roles"] == Role.SPECIAL).any()


def test_contrastive_view():
    _, tok, config = _gem_model(k=2, prefix_dropout=0.3)
    feats = [{"input_ids": tok(t)["input_ids"]} for t in sample_sentences(5, seed=8, min_words=10)]
    b = GEMDataCollator.from_tokenizer(tok, config, max_length=128, contrastive=True)(feats)
    n = int(b["gem_cl_num_texts"])
    assert n == 5
    ids, roles, doc = b["gem_cl_input_ids"], b["gem_cl_roles"], b["gem_cl_doc_ids"]
    for d in range(2 * n):
        sel = doc == d
        r, t = roles[sel], ids[sel]
        assert r[-2:].tolist() == [Role.SPECIAL] * 2 and t[-2:].tolist() == config.special_token_ids
        assert (r[:-2] == Role.PREFIX).all()
        text = t[:-2].tolist()
        if d < n:
            assert text == feats[d]["input_ids"]
        else:  # dropout view: an ordered subsequence of the text, BOS kept, shorter on average
            orig = iter(feats[d - n]["input_ids"])
            assert all(x in orig for x in text) and text[0] == tok.bos_token_id
    lens = [(doc == d).sum() for d in range(2 * n)]
    assert sum(lens[n:]) < sum(lens[:n])
    assert np.array_equal(b["gem_cl_position_ids"][doc == 0].numpy(), np.arange(int(lens[0])))
