"""A GEM export loads as SentenceTransformer(path) and in mteb, with GEMEmbedder's vectors."""

import json
import os

import pytest
import torch

from megatron_gem.embedder import GEMEmbedder
from megatron_gem.gem import GEMConfig
from megatron_gem.hf.export import export_hf
from megatron_gem.integrations import disable_gem, enable_gem
from megatron_gem.integrations.sentence_transformers import save_sentence_transformer
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences

TEXTS = sample_sentences(7, seed=5) + ["Fire.", "x"]


def _export(directory, k, seed):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=seed)
    config = GEMConfig(num_special_tokens=k)
    enable_gem(model, tok, config, backend="sdpa")
    with torch.no_grad():  # make the GEM rows differ from the mean so a wrong readout shows
        model.get_input_embeddings().weight[config.special_token_ids] += 0.5 * torch.randn(k, model.config.hidden_size)
    disable_gem(model)
    export_hf(model, tok, config, str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("st")
    return {1: _export(base / "k1", 1, seed=1), 2: _export(base / "k2", 2, seed=2)}


def test_k1_loads_with_builtin_modules_and_equals_gem_embedder(exports):
    from sentence_transformers import SentenceTransformer

    path = exports[1]
    tokenizer_config = open(os.path.join(path, "tokenizer_config.json")).read()
    assert save_sentence_transformer(path, max_seq_length=64) == "builtin"
    assert open(os.path.join(path, "tokenizer_config.json")).read() == tokenizer_config  # generation tokenizer untouched
    types = [m["type"] for m in json.load(open(os.path.join(path, "modules.json")))]
    assert all(t.startswith("sentence_transformers.") for t in types)
    st = SentenceTransformer(path, device="cpu")  # no trust_remote_code, no megatron_gem needed
    ref = GEMEmbedder.from_pretrained(path, backend="sdpa", max_length=64).encode(TEXTS)
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # Control: the plain model's last text token (no GEM token appended) is a different vector.
    st_plain = SentenceTransformer(path, device="cpu", processor_kwargs={"add_eos_token": False, "add_bos_token": True})
    assert not torch.allclose(st_plain.encode(TEXTS, convert_to_tensor=True), ref, atol=1e-3)
    # Truncation keeps room for the GEM token, as GEMEmbedder does.
    long_text = [" ".join(TEXTS) * 3]
    assert torch.allclose(
        st.encode(long_text, convert_to_tensor=True), GEMEmbedder.from_pretrained(path, backend="sdpa", max_length=64).encode(long_text), atol=1e-5
    )


def test_k2_loads_with_the_gem_module_and_equals_gem_embedder(exports):
    from sentence_transformers import SentenceTransformer

    path = exports[2]
    assert save_sentence_transformer(path) == "custom"
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(path, device="cpu")  # sentence-transformers >= 6 policy for non-ST module classes
    st = SentenceTransformer(path, device="cpu", trust_remote_code=True)
    ref = GEMEmbedder.from_pretrained(path, backend="sdpa").encode(TEXTS)
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    with pytest.raises(ValueError, match="K=1"):
        save_sentence_transformer(path, mode="builtin")
    # The export is still an ordinary causal LM for generation.
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path)
    assert lm.config._attn_implementation in ("sdpa", "eager") and lm.config.use_cache


def test_mteb_loads_the_export_by_path(exports):
    from mteb._create_dataloaders import _create_dataloader_from_texts
    from mteb.models import SentenceTransformerEncoderWrapper

    from megatron_gem.eval.tasks import offline_tasks

    path = exports[1]
    save_sentence_transformer(path, max_seq_length=64)
    wrapper = SentenceTransformerEncoderWrapper(path, device="cpu")  # mteb's own loader, given the path
    task = offline_tasks(scale=0.05)[0]
    loader = _create_dataloader_from_texts(TEXTS, batch_size=4)  # the loader mteb's tasks hand to encode()
    got = torch.as_tensor(wrapper.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default"))
    ref = GEMEmbedder.from_pretrained(path, backend="sdpa", max_length=64).encode(TEXTS)
    assert torch.allclose(got.float(), ref, atol=1e-5)


def test_custom_module_save_round_trip(exports, tmp_path):
    from sentence_transformers import SentenceTransformer

    save_sentence_transformer(exports[2])
    st = SentenceTransformer(exports[2], device="cpu", trust_remote_code=True)
    before = st.encode(TEXTS, convert_to_tensor=True)
    st.save(str(tmp_path / "again"))
    again = SentenceTransformer(str(tmp_path / "again"), device="cpu", trust_remote_code=True)
    assert torch.allclose(again.encode(TEXTS, convert_to_tensor=True), before, atol=1e-6)
    assert st[0].auto_model.config._attn_implementation == "gem"  # saving left the live module on GEM attention


def test_summary_adapter_folder_loads_base_plus_adapter(tmp_path):
    from sentence_transformers import SentenceTransformer

    from megatron_gem.hf.export import export_summary_adapter
    from megatron_gem.testing import save_tiny_reserved_base, tiny_summary_model

    base = save_tiny_reserved_base(tmp_path / "base", seed=2)
    lm, tok, cfg, adapter = tiny_summary_model(base, 1, seed=4)
    path = export_summary_adapter(lm, adapter, tok, cfg, str(tmp_path / "adapter"), base_path=base)
    with pytest.raises(ValueError, match="mode='custom'"):
        save_sentence_transformer(path, mode="builtin")  # K=1, but the builtin Transformer would drop the deltas
    assert save_sentence_transformer(path, max_seq_length=64) == "custom"
    st = SentenceTransformer(path, device="cpu", trust_remote_code=True)
    ref = GEMEmbedder.from_pretrained(path, backend="sdpa", max_length=64).encode(TEXTS)
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    st.save(str(tmp_path / "again"))  # saves the adapter folder again, not the base as a full model
    assert os.path.isfile(tmp_path / "again" / "adapter_config.json") and not os.path.exists(tmp_path / "again" / "model.safetensors")
    again = SentenceTransformer(str(tmp_path / "again"), device="cpu", trust_remote_code=True)
    assert torch.allclose(again.encode(TEXTS, convert_to_tensor=True), got, atol=1e-6)
