"""Local paths stay local (common/model_paths.py): the one check train.py, the tools and
GEMEmbedder.from_pretrained run before anything loads. No network: a name that could reach the
hub is refused while the hub is off, and a path-looking name never reaches it."""

import os
import shutil

import pytest

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.common.model_paths import check_model_source, loading, looks_like_path, max_positions


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))


def _dirs(tmp_path, tiny_inputs):
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_inputs["model"], "config.json"), config_only)
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a"}\n')
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    return {"empty": str(empty), "config_only": str(config_only), "data": str(data), "loop": str(loop)}


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("{empty}", {"tokenizer": True}, "is empty: no config.json, no tokenizer files"),
        ("{config_only}", {"tokenizer": True}, "is not a model directory: no tokenizer files"),
        ("{config_only}", {"weights": True}, "no weights (model.safetensors"),
        ("{data}", {}, "is a file; expected a checkpoint directory"),
        ("{loop}", {}, "link loop"),
        ("./typo/model", {}, "./typo/model: no such directory"),
        ("corpus_missing.jsonl", {}, "corpus_missing.jsonl: no such directory"),  # a file name, never a repo id
        ("a/b/c", {}, "a/b/c: no such directory"),
        ("org/not-cached-model", {}, "the hub is off (HF_HUB_OFFLINE) and the repo is not in the local HF cache"),
    ],
)
def test_a_wrong_model_source_is_refused_in_one_line(tmp_path, tiny_inputs, offline, name, kw, message):
    name = name.format(**_dirs(tmp_path, tiny_inputs))
    with pytest.raises(ModelLoadError) as e:
        check_model_source("--model", name, **kw)
    text = str(e.value)
    assert text.startswith(f"--model {name}") and message in text and "\n" not in text, text


def test_a_model_directory_passes(tiny_inputs, offline):
    assert check_model_source("--model", tiny_inputs["model"], config=True, tokenizer=True, weights=True) == tiny_inputs["model"]


def test_an_online_repo_id_is_left_to_transformers(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert check_model_source("--model", "meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("name", ["./x", "/x", "~/x", "x/y/z", "data.jsonl", "weights.safetensors", "a..b", "a--b", "x\\y"])
def test_path_like_names(name):
    assert looks_like_path(name)


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M"])
def test_repo_ids(name):
    assert not looks_like_path(name)


def test_a_truncated_safetensors_file_is_named(tiny_inputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_inputs["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelLoadError) as e:
        with loading(f"--model {model}", str(model)):
            AutoModelForCausalLM.from_pretrained(str(model))
    assert f"{weights}: not a readable safetensors file" in str(e.value)


def test_rope_scaling_note():
    assert max_positions({"max_position_embeddings": 512})[0] == 512
    assert "no RoPE scaling" in max_positions({"max_position_embeddings": 512})[1]
    n, note = max_positions({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert n == 131072 and "'llama3' (factor 8.0) is already counted" in note
