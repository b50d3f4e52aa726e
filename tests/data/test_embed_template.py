"""--gem-embed-template (GEMConfig.embed_template, gem/template.py): the text wrapped as
``[BOS] prefix text suffix`` before the summary tokens, the same way in the phase-2 views
(train.py's data, the HF collator) and at embedding time (GEMEmbedder, sentence-transformers),
truncating the text and never the template; "" leaves today's rows; the export records it."""

import json

import numpy as np
import pytest

from megatron_gem.data.samples import SampleBuilder
from megatron_gem.gem.config import GEMConfig
from megatron_gem.gem.roles import Role
from megatron_gem.gem.template import EmbedTemplate
from megatron_gem.training.args import ArgumentError, job_config, parse_args
from megatron_gem.training.data_setup import build_loaders, open_training_corpus

TEMPLATE = 'This text : "{text}" means in one word:"'
MAX_TEXT_LEN = 48  # --contrastive-max-length of the jobs below: long texts get truncated


@pytest.fixture(scope="module")
def gem_tokenizer(tiny_inputs):
    from transformers import AutoTokenizer

    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.testing import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_inputs["model"])
    add_gem_tokens(make_tiny_llama(len(tok)), tok, GEMConfig(num_special_tokens=2))
    return tok


def _sides(tok):
    before, after = TEMPLATE.split("{text}")
    return tok(before, add_special_tokens=False)["input_ids"], tok(after, add_special_tokens=False)["input_ids"]


def _job(tiny_inputs, tmp_path, tok, *extra):
    argv = ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(tmp_path / "out"), "--train-iters", "4"]
    argv += ["--gem-contrastive-from-step", "2", "--gem-num-special-tokens", "2", "--seq-length", "64", "--contrastive-max-length", str(MAX_TEXT_LEN), *extra]
    job = job_config(parse_args(argv), world_size=1)
    job.gem.special_token_ids = tok.convert_tokens_to_ids(job.gem.special_tokens)  # what the engines' build does
    return job


def _pairs_file(tmp_path, n=20):
    from megatron_gem.testing import sample_sentences

    queries = sample_sentences(n, seed=8, min_words=2, max_words=30)  # some longer than the budget
    answers = sample_sentences(n, seed=9, min_words=2, max_words=30)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": q, "positive": a}) + "\n" for q, a in zip(queries, answers)))
    return path, queries, answers


def test_empty_template_keeps_todays_rows(gem_tokenizer):
    """Template "": the view is the truncated text + specials, exactly as before the option."""
    cfg = GEMConfig(num_special_tokens=2, special_token_ids=[400, 401], prefix_dropout=0.3)
    builder = SampleBuilder(cfg, 64)
    tokens = np.asarray(gem_tokenizer("The cat runs under the old tree because the rain falls on the red house.")["input_ids"])
    assert EmbedTemplate.from_tokenizer("", gem_tokenizer).fit(tokens, 10)[0].tolist() == tokens[:10].tolist()
    (a_ids, a_roles), (p_ids, _), cut = builder.embed_pair(tokens, 3, 0, 12, positive_tokens=tokens[::-1].copy())
    assert a_ids.tolist() == tokens[:10].tolist() + [400, 401] and cut == 2 * (tokens.shape[0] - 10)
    assert a_roles.tolist() == [int(Role.PREFIX)] * 10 + [int(Role.SPECIAL)] * 2
    assert p_ids.tolist() == tokens[::-1][:10].tolist() + [400, 401]


def test_wrapped_rows_truncate_the_text_not_the_template(gem_tokenizer):
    prefix, suffix = _sides(gem_tokenizer)
    cfg = GEMConfig(num_special_tokens=2, special_token_ids=[400, 401], prefix_dropout=0.5, embed_template=TEMPLATE)
    template = EmbedTemplate.from_tokenizer(TEMPLATE, gem_tokenizer)
    assert template.lead_id == gem_tokenizer.bos_token_id  # the tiny tokenizer adds a BOS: it stays first
    builder = SampleBuilder(cfg, 64, embed_template=template)
    long = np.asarray(gem_tokenizer(" ".join(["the red cat runs"] * 12))["input_ids"])
    short = np.asarray(gem_tokenizer("the dog")["input_ids"])
    budget = MAX_TEXT_LEN - 2 - len(prefix) - len(suffix)
    assert budget > 1 and long.shape[0] > budget
    (ids, roles), _, cut = builder.embed_pair(long, 0, 0, MAX_TEXT_LEN, positive_tokens=short)
    bos = [gem_tokenizer.bos_token_id]
    assert ids.tolist() == bos + prefix + long[1:budget].tolist() + suffix + [400, 401]
    assert ids.shape[0] == MAX_TEXT_LEN and cut == long.shape[0] - budget
    assert roles.tolist() == [int(Role.PREFIX)] * (MAX_TEXT_LEN - 2) + [int(Role.SPECIAL)] * 2
    # Self-supervised: dropout deletes text tokens only; the template and the BOS survive whole.
    _, (p_ids, _), _ = builder.embed_pair(long, 5, 0, MAX_TEXT_LEN)
    p = p_ids.tolist()
    assert p[: 1 + len(prefix)] == bos + prefix and p[-2 - len(suffix) :] == suffix + [400, 401]
    assert len(p) < MAX_TEXT_LEN  # rate 0.5 dropped some of the text
    # A builder without the template the config names refuses to build views (no bare texts trained by mistake).
    with pytest.raises(ValueError, match="embed_template"):
        SampleBuilder(cfg, 64).embed_text(short, MAX_TEXT_LEN)
    with pytest.raises(ValueError, match="leaves no room for text"):
        builder.embed_text(short, 2 + len(prefix) + len(suffix))


def test_training_views_equal_what_the_embedder_embeds(tiny_inputs, tmp_path, gem_tokenizer):
    """The phase-2 views train.py builds are GEMEmbedder's rows for the same texts (anchors,
    positives), truncation included; the collator's are too."""
    from megatron_gem.embedder import GEMEmbedder
    from megatron_gem.integrations import GEMDataCollator
    from megatron_gem.testing import make_tiny_llama

    pairs, queries, answers = _pairs_file(tmp_path)
    job = _job(tiny_inputs, tmp_path, gem_tokenizer, "--contrastive-data", str(pairs), "--gem-embed-template", TEMPLATE)
    assert job.gem.embed_template == TEMPLATE
    _, loader = build_loaders(job, open_training_corpus(job.data, gem_tokenizer), gem_tokenizer, dp_rank=0, dp_size=1)
    ds = loader.dataset
    emb = GEMEmbedder(make_tiny_llama(len(gem_tokenizer)), gem_tokenizer, job.gem, backend="sdpa", max_length=MAX_TEXT_LEN)
    specials, extra = job.gem.special_token_ids, sum(map(len, _sides(gem_tokenizer)))
    truncated = 0
    for i in range(len(queries)):
        d = int(ds._epoch_docs(0)[i])
        (a_ids, _), (p_ids, _), _ = ds[i]
        want_a, want_p = emb.text_tokens([queries[d], answers[d]])
        assert a_ids.tolist() == want_a + specials and p_ids.tolist() == want_p + specials
        # ... and the embedder's batch rows are those ids.
        assert emb._batch([want_a], "right")["input_ids"][0].tolist() == a_ids.tolist()
        truncated += len(gem_tokenizer(queries[d])["input_ids"]) > len(want_a) - extra
    assert truncated  # the check covered truncated texts
    # The HF collator wraps its contrastive view the same way.
    collator = GEMDataCollator.from_tokenizer(gem_tokenizer, job.gem, contrastive=True, max_length=MAX_TEXT_LEN)
    batch = collator([{"input_ids": gem_tokenizer(q)["input_ids"]} for q in queries[:4]])
    ids, docs = batch["gem_cl_input_ids"], batch["gem_cl_doc_ids"]
    for j, q in enumerate(queries[:4]):
        assert ids[docs == j].tolist() == emb.text_tokens([q])[0] + specials
    with pytest.raises(ValueError, match="embed_template"):
        GEMDataCollator(config=job.gem, contrastive=True)


def test_export_round_trip_applies_the_template(tmp_path):
    """A summary-mode export records the template in gem_config.json; GEMEmbedder.from_pretrained
    and the sentence-transformers module on the folder apply it (the vectors of the live model
    with the template, not those without)."""
    import torch

    from megatron_gem.embedder import GEMEmbedder
    from megatron_gem.hf.export import export_summary_adapter
    from megatron_gem.integrations.sentence_transformers import GEMSentenceEncoder
    from megatron_gem.testing import sample_sentences, save_tiny_reserved_base, tiny_summary_model

    base = save_tiny_reserved_base(tmp_path / "base", seed=3)
    lm, tok, cfg, adapter = tiny_summary_model(base, 2, seed=1)
    texts = sample_sentences(4, seed=2)
    plain = GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa", max_length=12)
    assert plain.text_tokens(texts) == [tok(t)["input_ids"][:10] for t in texts]  # "": today's truncated text
    bare = GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa").encode(texts)
    cfg.embed_template = TEMPLATE
    live = GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa")
    ref = live.encode(texts)
    assert not torch.allclose(ref, bare)  # the template changes what is embedded
    path = export_summary_adapter(lm, adapter, tok, cfg, str(tmp_path / "hf"), base_path=base)
    assert json.load(open(f"{path}/gem_config.json"))["embed_template"] == TEMPLATE
    loaded = GEMEmbedder.from_pretrained(path, backend="sdpa")
    assert loaded.template.template == TEMPLATE and loaded.text_tokens(texts) == live.text_tokens(texts)
    assert torch.equal(loaded.encode(texts), ref)
    st = GEMSentenceEncoder(path, backend="sdpa")
    assert torch.equal(st.preprocess(texts)["input_ids"], loaded._batch(loaded.text_tokens(texts, 512), "right")["input_ids"])


def test_bad_templates_are_refused_naming_the_flag(tiny_inputs, tmp_path, gem_tokenizer):
    with pytest.raises(ArgumentError, match="--gem-embed-template"):
        _job(tiny_inputs, tmp_path, gem_tokenizer, "--gem-embed-template", "no placeholder")
    with pytest.raises(ValueError, match="embed_template"):
        GEMConfig(embed_template="{text} and {text}")
    # A template that leaves no text in --contrastive-max-length fails when the data is set up, not at the first batch.
    job = _job(tiny_inputs, tmp_path, gem_tokenizer, "--gem-embed-template", "word " * 30 + "{text}")
    with pytest.raises(ValueError, match="leaves no room for text"):
        build_loaders(job, open_training_corpus(job.data, gem_tokenizer), gem_tokenizer, dp_rank=0, dp_size=1)


def test_sentence_transformers_export_with_a_template_is_custom(gem_hf_checkpoint, tmp_path):
    """K = 1 full mode would get the builtin modules, whose tokenizer only appends the GEM token:
    with a template the export takes the custom module (GEMEmbedder's rows), and refuses builtin."""
    import os
    import shutil

    from megatron_gem.hf.sentence_transformers_files import save_sentence_transformer

    path = str(tmp_path / "ckpt")
    shutil.copytree(gem_hf_checkpoint, path)
    if os.path.exists(os.path.join(path, "manifest.json")):
        os.remove(os.path.join(path, "manifest.json"))
    assert save_sentence_transformer(path) == "builtin"  # without a template
    cfg = GEMConfig.load(path)
    cfg.embed_template = TEMPLATE
    cfg.save(path)
    with pytest.raises(ValueError, match="embed_template"):
        save_sentence_transformer(path, mode="builtin")
    assert save_sentence_transformer(path) == "custom"
