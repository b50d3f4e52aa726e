"""--contrastive-query-prompt: the phase-2 anchors (self-supervised texts and the query side of
--contrastive-data pairs) carry the prompt, tokenised as inference tokenises prompt + text; the
positives do not; gem_config records it."""

import json

import numpy as np
import pytest

from megatron_gem.gem.roles import Role
from megatron_gem.training.args import job_config, parse_args
from megatron_gem.training.data_setup import build_loaders, open_training_corpus

PROMPT = "query: "


def _job(tiny_inputs, tmp_path, tok, *extra):
    argv = ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(tmp_path / "out"), "--train-iters", "4"]
    argv += ["--gem-contrastive-from-step", "2", "--gem-num-special-tokens", "2", "--gem-prefix-dropout", "0", "--seq-length", "64", *extra]
    job = job_config(parse_args(argv), world_size=1)
    job.gem.special_token_ids = tok.convert_tokens_to_ids(job.gem.special_tokens)  # what the engines' build does
    return job


def _texts(ds, index):
    """(anchor tokens, positive tokens) of item ``index`` without their special tokens."""
    (a_ids, a_roles), (p_ids, p_roles), _ = ds[index]
    text = lambda ids, roles: [int(t) for t, r in zip(ids, roles) if r != int(Role.SPECIAL)]
    return text(a_ids, a_roles), text(p_ids, p_roles)


@pytest.fixture(scope="module")
def gem_tokenizer(tiny_inputs):
    from transformers import AutoTokenizer

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.testing import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_inputs["model"])
    add_gem_tokens(make_tiny_llama(len(tok)), tok, GEMConfig(num_special_tokens=2))
    return tok


def _check(ds, tok, queries, positives):
    budget = ds.max_text_len - 2  # truncated as GEMEmbedder truncates: the prompt is kept, the text's end cut
    for i in range(6):
        d = int(ds._epoch_docs(0)[i])
        anchor, positive = _texts(ds, i)
        assert anchor == tok(PROMPT + queries[d])["input_ids"][:budget]  # the string inference embeds
        assert positive == tok(positives[d])["input_ids"][:budget]  # documents carry no prompt


def test_self_supervised_anchors_carry_the_prompt(tiny_inputs, tmp_path, gem_tokenizer):
    job = _job(tiny_inputs, tmp_path, gem_tokenizer, "--contrastive-query-prompt", PROMPT)
    assert job.gem.query_prompt == PROMPT
    corpus = open_training_corpus(job.data, gem_tokenizer)
    _, loader = build_loaders(job, corpus, gem_tokenizer, dp_rank=0, dp_size=1)
    texts = [json.loads(line)["text"] for line in open(tiny_inputs["data"])]
    _check(loader.dataset, gem_tokenizer, texts, texts)
    # BPE merges the prompt's trailing space into the next word: the prompt's own tokens
    # prepended would be a different (never-seen-at-inference) sequence.
    t = "the cat runs."
    assert gem_tokenizer(PROMPT + t)["input_ids"] != gem_tokenizer(PROMPT)["input_ids"] + gem_tokenizer(t)["input_ids"][1:]
    # Without the flag the anchors are the plain texts.
    _, plain = build_loaders(_job(tiny_inputs, tmp_path, gem_tokenizer), corpus, gem_tokenizer, dp_rank=0, dp_size=1)
    assert _texts(plain.dataset, 0)[0] == gem_tokenizer(texts[int(plain.dataset._epoch_docs(0)[0])])["input_ids"][: plain.dataset.max_text_len - 2]


def test_pair_queries_carry_the_prompt_and_positives_do_not(tiny_inputs, tmp_path, gem_tokenizer):
    from megatron_gem.testing import sample_sentences

    pairs = tmp_path / "pairs.jsonl"
    queries = [f"what is item {i}?" for i in range(20)]
    answers = sample_sentences(20, seed=4)
    pairs.write_text("".join(json.dumps({"query": q, "positive": a}) + "\n" for q, a in zip(queries, answers)))
    job = _job(tiny_inputs, tmp_path, gem_tokenizer, "--contrastive-data", str(pairs), "--contrastive-query-prompt", PROMPT)
    corpus = open_training_corpus(job.data, gem_tokenizer)
    _, loader = build_loaders(job, corpus, gem_tokenizer, dp_rank=0, dp_size=1)
    _check(loader.dataset, gem_tokenizer, queries, answers)


def test_prompted_text_round_trips_a_tokenised_text(gem_tokenizer):
    from megatron_gem.data.tokenization import PromptedText

    text = "Rain falls on the old house."
    tokens = np.asarray(gem_tokenizer(text)["input_ids"])
    assert PromptedText(gem_tokenizer, "Instruct: find it\nQuery: ")(tokens).tolist() == gem_tokenizer("Instruct: find it\nQuery: " + text)["input_ids"]
    with pytest.raises(ValueError, match="non-empty prompt"):
        PromptedText(gem_tokenizer, "")
