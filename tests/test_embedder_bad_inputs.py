"""GEMEmbedder under bad input: a path that is not a GEM checkpoint is refused in one line
naming it, before anything loads (before: "corpus.jsonl" was read as a config, a typo went to
the hub); encode() refuses what is not text (before: transformers' internals failed)."""

import os
import shutil

import pytest

from megatron_gem import GEMEmbedder
from megatron_gem.common.errors import ModelLoadError


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    from megatron_gem import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer

    d = tmp_path_factory.mktemp("embedder_inputs") / "gem"
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    cfg = GEMConfig()
    add_gem_tokens(model, tok, cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg.save(d)
    return str(d)


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the path was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_paths_that_are_not_gem_checkpoints(tmp_path, tiny_inputs, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(corpus): "corpus.jsonl: is a file; expected a checkpoint directory",
        "corpus_typo.jsonl": "corpus_typo.jsonl: no such directory",
        "./no/model": "./no/model: no such directory",
        "org/not-cached": "the hub is off",
        str(empty): "is empty: no config.json, no tokenizer files",
        tiny_inputs["model"]: "no gem_config.json; not a GEM checkpoint",
    }
    for path, message in cases.items():
        with pytest.raises(ModelLoadError) as e:
            GEMEmbedder.from_pretrained(path)
        assert message in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_a_truncated_weights_file_without_a_manifest_is_named(embedder_dir, tmp_path):
    model = tmp_path / "gem"
    shutil.copytree(embedder_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    with pytest.raises(ModelLoadError, match=f"{weights}: not a readable safetensors file"):
        GEMEmbedder.from_pretrained(str(model))


@pytest.mark.parametrize("texts, message", [([None], "text 0 is NoneType"), (["fine", 1], "text 1 is int"), ([b"bytes"], "text 0 is bytes")])
def test_encode_refuses_what_is_not_text(embedder_dir, texts, message):
    emb = GEMEmbedder.from_pretrained(embedder_dir, max_length=32)
    with pytest.raises(TypeError, match=message):
        emb.encode(texts)


def test_encode_token_ids_refuses_ids_outside_the_vocabulary(embedder_dir):
    emb = GEMEmbedder.from_pretrained(embedder_dir, max_length=32)
    rows = emb.model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=f"token id {rows} outside the vocabulary"):
        emb.encode_token_ids([[1, 5, rows]])
    with pytest.raises(TypeError, match="not a sequence of token ids"):
        emb.encode_token_ids([7])
    with pytest.raises(TypeError, match="not one list of integer token ids"):
        emb.encode_token_ids([[1.5, 2.0]])
