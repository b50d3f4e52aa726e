"""--gem-embed-template chat: the tokenizer's own chat template around one user message, up to the
start of the assistant turn, is the embed template (gem/template.py CHAT). The wrapped ids are the
tokens of the chat prompt itself (apply_chat_template), training's phase-2 views are built by it,
and the summary tokens read from a real chat prefill (generate() on apply_chat_template's prompt)
give encode() of the message, in summary and full mode."""

import os
import shutil

import pytest
import torch

from megatron_gem import GEMConfig, GEMEmbedder
from megatron_gem.gem.template import CHAT, EmbedTemplate
from megatron_gem.gem.tokens import add_gem_tokens
from megatron_gem.serve.engine import prompt_cache
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences, save_tiny_reserved_base, tiny_summary_model
from tests.serve.conftest import CHAT_TEMPLATE

TEXTS = sample_sentences(4, seed=17) + ["Rain.", " leading space", "two\nlines"]


def chat_ids(tok, text):
    """The chat prompt's tokens as transformers serve and vLLM build them."""
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


def _chat_tokenizer():
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_wrapped_ids_are_the_chat_prompt():
    tok = _chat_tokenizer()
    template = EmbedTemplate.from_tokenizer(CHAT, tok)
    assert template.lead_id == tok.bos_token_id and template.drop_lead  # the rendered prefix starts with the BOS
    for text in TEXTS:
        assert template.wrap(tok(text)["input_ids"]).tolist() == chat_ids(tok, text)
    wrapped, cut = template.fit(tok(" ".join(TEXTS))["input_ids"], template.extra + 5)
    assert cut > 0 and len(wrapped) <= template.extra + 5  # the text is cut, the template kept
    with pytest.raises(ValueError, match="no chat template"):
        EmbedTemplate.from_tokenizer(CHAT, make_tiny_tokenizer())
    GEMConfig(embed_template=CHAT)  # a valid value


def test_smollm2_chat_template():
    """The real model's template (SmolLM2-135M-Instruct: ChatML with a default system prompt)."""
    path = os.path.join(os.path.expanduser("~"), ".cache", "megatron_gem", "SmolLM2-135M-Instruct")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        pytest.skip("SmolLM2 is not cached yet (megatron_gem.packaged_models.smollm2_135m_dir builds it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    template = EmbedTemplate.from_tokenizer(CHAT, tok)
    assert template.lead_id is None  # this tokenizer adds no BOS
    for text in TEXTS + ["What does the zip() function do?", "Ünïcode — dashes"]:
        assert template.wrap(tok(text)["input_ids"]).tolist() == chat_ids(tok, text)


def test_training_views_use_the_chat_template(tiny_inputs, tmp_path):
    import json

    from megatron_gem.training.args import job_config, parse_args
    from megatron_gem.training.data_setup import build_loaders, open_training_corpus

    model = tmp_path / "model"
    shutil.copytree(tiny_inputs["model"], model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    add_gem_tokens(make_tiny_llama(len(tok)), tok, GEMConfig(num_special_tokens=2))
    pairs = tmp_path / "pairs.jsonl"
    queries, answers = sample_sentences(6, seed=3), sample_sentences(6, seed=4)
    pairs.write_text("".join(json.dumps({"query": q, "positive": a}) + "\n" for q, a in zip(queries, answers)))
    argv = ["--model", str(model), "--data", tiny_inputs["data"], "--save", str(tmp_path / "out"), "--train-iters", "4", "--gem-contrastive-from-step", "2"]
    argv += [
        "--gem-num-special-tokens",
        "2",
        "--seq-length",
        "128",
        "--contrastive-max-length",
        "120",
        "--contrastive-data",
        str(pairs),
        "--gem-embed-template",
        "chat",
    ]
    job = job_config(parse_args(argv), world_size=1)
    assert job.gem.embed_template == CHAT
    job.gem.special_token_ids = tok.convert_tokens_to_ids(job.gem.special_tokens)
    _, loader = build_loaders(job, open_training_corpus(job.data, tok), tok, dp_rank=0, dp_size=1)
    specials = job.gem.special_token_ids
    for i in range(len(queries)):
        d = int(loader.dataset._epoch_docs(0)[i])
        (a_ids, _), (p_ids, _), _ = loader.dataset[i]
        assert a_ids.tolist() == chat_ids(tok, queries[d]) + specials and p_ids.tolist() == chat_ids(tok, answers[d]) + specials
    job.gem.save(tmp_path / "saved")
    assert GEMConfig.load(tmp_path / "saved").embed_template == CHAT


def _embedder(mode, tmp_path):
    if mode == "summary":
        base = save_tiny_reserved_base(tmp_path / "base", seed=2)
        lm, tok, cfg, adapter = tiny_summary_model(base, 2, seed=6)
        tok.chat_template = CHAT_TEMPLATE
        cfg.embed_template = CHAT
        return GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa")
    tok = _chat_tokenizer()
    lm = make_tiny_llama(len(tok), seed=8)
    cfg = GEMConfig(num_special_tokens=1, embed_template=CHAT)
    add_gem_tokens(lm, tok, cfg)
    with torch.no_grad():
        lm.get_input_embeddings().weight[cfg.special_token_ids] += 0.5 * torch.randn(1, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return GEMEmbedder.from_pretrained(lm, tok, config=cfg, backend="sdpa")


@pytest.mark.parametrize("mode", ["summary", "full"])
def test_readout_from_a_chat_prefill_equals_encode(mode, tmp_path):
    emb = _embedder(mode, tmp_path)
    tok = emb.tokenizer
    for text in TEXTS[:4]:
        prompt = torch.tensor([chat_ids(tok, text)])
        with torch.no_grad():
            out = emb.model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        got = emb.embed_from_cache(prompt_cache(cache, prompt.shape[1]))
        assert torch.allclose(got, emb.encode([text]), atol=1e-5, rtol=0), (got - emb.encode([text])).abs().max()
    # Control: the whole cache (the answer's tokens too) is another text: 10x the tolerance away at least.
    assert (emb.embed_from_cache(cache) - emb.encode([text])).abs().max() > 1e-4
