"""Every HF export is embedder-ready: export_hf writes the sentence-transformers files (query
prompt included) and the model card, all in the manifest; rewriting them keeps the manifest
true; evaluation figures reach the card; the mteb wrapper gives the same vectors."""

import json
import os

import pytest
import torch

from megatron_gem.common.manifest import CheckpointError, verify
from megatron_gem.embedder import GEMEmbedder
from megatron_gem.gem import GEMConfig
from megatron_gem.hf.export import export_hf
from megatron_gem.hf.model_card import record_evaluation
from megatron_gem.hf.sentence_transformers_files import CUSTOM_MODULE, save_sentence_transformer
from megatron_gem.integrations import disable_gem, enable_gem
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer
from tests.embedder_checks import TEXTS, assert_embedder_ready

PROMPT = "query: "


def _export(directory, k, seed, prompt=""):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=seed)
    config = GEMConfig(num_special_tokens=k, query_prompt=prompt)
    enable_gem(model, tok, config, backend="sdpa")
    with torch.no_grad():  # make the GEM rows differ from the mean so a wrong readout shows
        model.get_input_embeddings().weight[config.special_token_ids] += 0.5 * torch.randn(k, model.config.hidden_size)
    disable_gem(model)
    info = {"step": 7, "config": {"model": {"path": "org/base-lm"}, "data": {"paths": ["corpus.jsonl"]}, "optimizer": {"train_iters": 7}}}
    export_hf(model, tok, config, str(directory), extra=info)
    return str(directory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return {1: _export(base / "k1", 1, seed=1, prompt=PROMPT), 2: _export(base / "k2", 2, seed=2, prompt=PROMPT), "plain": _export(base / "p", 1, seed=3)}


@pytest.mark.parametrize("k", [1, 2, "plain"])
def test_export_hf_is_embedder_ready(exports, k):
    assert_embedder_ready(exports[k], query_prompt="" if k == "plain" else PROMPT)


def test_custom_module_path_is_the_class(exports):
    from megatron_gem.integrations.sentence_transformers import GEMSentenceEncoder

    assert f"{GEMSentenceEncoder.__module__}.{GEMSentenceEncoder.__qualname__}" == CUSTOM_MODULE


def test_model_card_states_what_the_export_holds(exports):
    card = open(os.path.join(exports[2], "README.md")).read()
    assert "base_model: org/base-lm" in card and "| summary tokens K | 2 (`<|gem_0|>`" in card
    assert "steps: 7 of 7" in card and "`corpus.jsonl`" in card and "'query: '" in card
    assert "trust_remote_code=True" in card and 'prompt_name="query"' in card
    assert "Not evaluated yet" in card
    assert "trust_remote_code" not in open(os.path.join(exports["plain"], "README.md")).read()


def test_rewrites_keep_the_manifest_true_and_refuse_a_damaged_export(exports, tmp_path):
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(exports[1], path)
    assert save_sentence_transformer(path, mode="custom") == "custom"  # a rewrite in place
    assert not os.path.exists(os.path.join(path, "1_Pooling")) and "gem_sentence_config.json" in verify(path)["files"]
    card = record_evaluation(path, "mteb", {"Lee50DocSim": {"main_score": 0.4321}}, command="tools/eval_mteb.py --model d --output r")
    record_evaluation(path, "lm", {"gem_trivia_mc": {"acc": 0.25}}, command="tools/eval_lm.py --model d --output r")
    text = open(card).read()
    assert "Not evaluated yet" not in text and "| Lee50DocSim | main_score | 0.4321 |" in text and "| gem_trivia_mc | acc | 0.2500 |" in text
    assert text.count("## Evaluation") == 1 and "## GEM configuration" in text  # the rest of the card is kept
    assert json.load(open(os.path.join(path, "eval_results.json")))["mteb"]["command"].startswith("tools/eval_mteb.py")
    assert {"README.md", "eval_results.json"} <= set(verify(path)["files"])
    GEMEmbedder.from_pretrained(path)  # verifies the manifest
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        record_evaluation(path, "mteb", {}, command="x")  # a damaged export is refused, not re-blessed


def test_mteb_wrapper_gives_the_same_vectors_with_the_query_prompt(exports):
    from mteb._create_dataloaders import _create_dataloader_from_texts
    from mteb.types import PromptType

    from megatron_gem.eval.mteb_model import load_mteb_model
    from megatron_gem.eval.tasks import offline_tasks

    path = exports[1]
    emb = GEMEmbedder.from_pretrained(path)
    task = offline_tasks(scale=0.05)[0]
    docs, queries = emb.encode(TEXTS), emb.encode_queries(TEXTS)
    for method in ("gem", "st"):
        model = load_mteb_model(path, method, show_progress_bar=False)
        kw = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default")
        for prompt_type, ref in ((PromptType.query, queries), (PromptType.document, docs), (None, docs)):
            got = torch.as_tensor(model.encode(_create_dataloader_from_texts(TEXTS, batch_size=2), prompt_type=prompt_type, **kw))
            assert torch.allclose(got, ref, atol=1e-5), (method, prompt_type)


def test_summary_mode_export_gets_the_custom_module_and_a_summary_card(tmp_path):
    # An adapter folder (summary mode) is embedder-ready too: sentence-transformers' custom module
    # loads base + deltas (the builtin modules would load the base alone), and the card says so.
    import json

    from megatron_gem.hf.export import export_summary_adapter
    from megatron_gem.testing import save_tiny_reserved_base, tiny_summary_model

    base = save_tiny_reserved_base(tmp_path / "base", seed=1)
    lm, tok, cfg, adapter = tiny_summary_model(base, 1, seed=1)
    path = export_summary_adapter(lm, adapter, tok, cfg, str(tmp_path / "summary"), base_path=base)
    modules = json.load(open(os.path.join(path, "modules.json")))
    assert [m["type"] for m in modules] == ["megatron_gem.integrations.sentence_transformers.GEMSentenceEncoder"]
    card = open(os.path.join(path, "README.md")).read()
    assert "GEMEmbedder.from_pretrained" in card and "| train mode | summary |" in card
