"""Summary-mode adapter folders: the PEFT aLoRA format, PEFT reproducing our vectors, the
guard that refuses folders and loads that would give other vectors, the base digest, and the
self-contained variant."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from megatron_gem.attention.hf import use_gem_attention
from megatron_gem.common.errors import ModelLoadError
from megatron_gem.common.manifest import verify
from megatron_gem.embedder import GEMEmbedder
from megatron_gem.gem.readout import pool_special_states
from megatron_gem.hf.export import export_summary_adapter
from megatron_gem.hf.summary_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MARKER, base_model_digest
from megatron_gem.testing import RESERVED_TOKENS, sample_sentences, save_tiny_reserved_base, tiny_summary_model

# The last text contains a summary token itself: PEFT activates from the LAST occurrence, ours
# only at SPECIAL positions; on the embed layout both are the K appended tokens.
TEXTS = sample_sentences(5, seed=7) + ["x", f"A text with {RESERVED_TOKENS[0]} inside it."]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_reserved_base(tmp_path_factory.mktemp("summary_base") / "base", seed=3)


@pytest.fixture(scope="module")
def exports(base_dir, tmp_path_factory):
    """{K: (folder, the live embedder's vectors of TEXTS)} for K = 1, 2."""
    root = tmp_path_factory.mktemp("summary_exports")
    out = {}
    for k in (1, 2):
        lm, tok, cfg, adapter = tiny_summary_model(base_dir, k, seed=k)
        ref = GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa").encode(TEXTS)
        path = export_summary_adapter(lm, adapter, tok, cfg, str(root / f"k{k}"), {"step": 7}, base_path=base_dir)
        out[k] = (path, ref)
    return out


def _copy(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    d = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    json.dump(d, open(path, "w"))


def test_folder_is_a_peft_alora_folder(exports, base_dir):
    from safetensors import safe_open

    path, _ = exports[2]
    verify(path)  # manifest written last, every file listed
    peft = json.load(open(os.path.join(path, ADAPTER_CONFIG)))
    gem = json.load(open(os.path.join(path, "gem_config.json")))
    assert peft["peft_type"] == "LORA" and peft["task_type"] == "CAUSAL_LM" and peft["r"] == 4 and peft["lora_alpha"] == 8
    assert peft["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert peft["alora_invocation_tokens"] == gem["special_token_ids"] and len(gem["special_token_ids"]) == 2
    assert gem["train_mode"] == "summary" and gem["summary_tokens"] == list(RESERVED_TOKENS)
    assert gem["base_model"] == os.path.abspath(base_dir) == peft["base_model_name_or_path"]
    assert gem["base_model_digest"] == base_model_digest(base_dir) and gem["base_model_digest"].startswith("sha256:")
    assert json.load(open(os.path.join(path, "training_info.json"))) == {"step": 7}
    with safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
        shape_a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape
        shape_b = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").shape
    assert len(keys) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert tuple(shape_a) == (4, 64) and tuple(shape_b) == (64, 4)
    assert meta[MARKER] == "1" and json.loads(meta["gem_invocation_tokens"]) == gem["special_token_ids"]
    assert not any(n.endswith(".safetensors") and n != ADAPTER_WEIGHTS for n in os.listdir(path))  # the base weights are not copied


@pytest.mark.parametrize("k", [1, 2])
def test_reload_equals_the_live_model_and_differs_from_the_base(exports, base_dir, k):
    path, ref = exports[k]
    emb = GEMEmbedder.from_pretrained(path, backend="sdpa")
    assert emb.base_path == os.path.abspath(base_dir)
    assert torch.equal(emb.encode(TEXTS), ref)
    with torch.no_grad():  # control: the untrained adapter (the base model) gives other vectors
        for delta in emb.adapter.deltas.values():
            delta.lora_B.zero_()
    assert (emb.encode(TEXTS) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_peft_reproduces_our_vectors_under_gem_attention(exports, base_dir, k, padding_side):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, ref = exports[k]
    ours = GEMEmbedder.from_pretrained(path, backend="sdpa")
    base = use_gem_attention(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), backend="sdpa")
    peft = PeftModel.from_pretrained(base, path).eval()
    batch = ours._batch([ours.tokenizer(t)["input_ids"] for t in TEXTS], padding_side)
    with torch.no_grad():  # PeftModel.forward computes the aLoRA offsets from input_ids
        hidden = peft(**batch, use_cache=False, output_hidden_states=True).hidden_states[-1]
    got = F.normalize(pool_special_states(hidden, batch["roles"], batch["doc_ids"], len(TEXTS)), dim=-1)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()


def test_k1_needs_no_gem_attention_in_peft_and_k2_does(exports, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for k in (1, 2):
        path, ref = exports[k]
        ours = GEMEmbedder.from_pretrained(path, backend="sdpa")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path).eval()  # plain sdpa, causal
        got = []
        with torch.no_grad():
            for t in TEXTS:
                ids = torch.tensor([ours.tokenizer(t)["input_ids"] + ours.special_ids])
                got.append(peft(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -k:].mean(0))
        got = F.normalize(torch.stack(got), dim=-1)
        if k == 1:  # with one summary token the GEM mask is the causal mask
            assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        else:  # causal attention lets the second summary token see the first: not our vectors
            assert (got - ref).abs().max() > 1e-3


def test_transformers_own_adapter_loading_is_inert_and_refused(exports, base_dir):
    from transformers import AutoModelForCausalLM

    path, _ = exports[1]
    auto = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # transformers attaches the aLoRA itself
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ours = GEMEmbedder.from_pretrained(path, backend="sdpa")
    ids = torch.tensor([ours.tokenizer(TEXTS[0])["input_ids"] + ours.special_ids])
    with torch.no_grad():  # nothing sets the activation offsets: the base model, silently
        assert torch.equal(auto(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(ModelLoadError, match="PEFT LoRA layers"):
        GEMEmbedder(auto, ours.tokenizer, ours.config, adapter=ours.adapter)


def test_guard_refuses_folders_that_would_give_other_vectors(exports, base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = exports[2]
    ids = json.load(open(os.path.join(path, "gem_config.json")))["special_token_ids"]

    def refused(folder, match, **kw):
        with pytest.raises(ModelLoadError, match=match):
            GEMEmbedder.from_pretrained(folder, verify=False, **kw)

    p = _copy(path, tmp_path, "no_tokens")  # re-saved by a tool that drops the key: a plain LoRA
    _edit_json(os.path.join(p, ADAPTER_CONFIG), alora_invocation_tokens=None)
    refused(p, "no alora_invocation_tokens")
    p = _copy(path, tmp_path, "other_tokens")
    _edit_json(os.path.join(p, ADAPTER_CONFIG), alora_invocation_tokens=ids[::-1])
    refused(p, "differ from gem_config.json special_token_ids")
    p = _copy(path, tmp_path, "rank")
    _edit_json(os.path.join(p, ADAPTER_CONFIG), lora_alpha=16)
    refused(p, "lora_alpha=16")
    p = _copy(path, tmp_path, "no_marker")  # weights re-saved without our metadata
    w = os.path.join(p, ADAPTER_WEIGHTS)
    save_file(load_file(w), w)
    refused(p, "marker")
    p = _copy(path, tmp_path, "full_mode")
    _edit_json(os.path.join(p, "gem_config.json"), train_mode="full")
    refused(p, "train_mode='full'")
    p = _copy(path, tmp_path, "plain_peft")  # someone's LoRA folder, not a GEM export
    os.remove(os.path.join(p, "gem_config.json"))
    refused(p, "without gem_config.json")
    p = _copy(path, tmp_path, "no_adapter_config")
    os.remove(os.path.join(p, ADAPTER_CONFIG))
    refused(p, "adapter_config.json is missing")


def test_wrong_base_is_refused_naming_both_and_base_overrides(exports, base_dir, tmp_path):
    path, ref = exports[1]
    other = save_tiny_reserved_base(tmp_path / "other", seed=11)
    with pytest.raises(ModelLoadError, match="wrong base checkpoint") as e:
        GEMEmbedder.from_pretrained(path, base=other)
    assert other in str(e.value) and base_model_digest(other) in str(e.value) and base_model_digest(base_dir) in str(e.value)
    moved = _copy(base_dir, tmp_path, "moved_base")  # the same weights elsewhere: accepted
    assert torch.equal(GEMEmbedder.from_pretrained(path, base=moved, backend="sdpa").encode(TEXTS), ref)
    with pytest.raises(ValueError, match="not a summary-mode adapter folder"):
        GEMEmbedder.from_pretrained(base_dir, base=moved)


def test_export_refuses_a_base_that_changed_since_the_run_started(base_dir, tmp_path):
    lm, tok, cfg, adapter = tiny_summary_model(base_dir, 1)
    cfg.base_model_digest = "sha256:" + "0" * 64
    with pytest.raises(ValueError, match="base checkpoint changed"):
        export_summary_adapter(lm, adapter, tok, cfg, str(tmp_path / "out"), base_path=base_dir)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp")


def test_self_contained_folder_works_alone(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _copy(base_dir, tmp_path, "base_copy")
    lm, tok, cfg, adapter = tiny_summary_model(base, 2, seed=5)
    ref = GEMEmbedder(lm, tok, cfg, adapter=adapter, backend="sdpa").encode(TEXTS)
    path = export_summary_adapter(lm, adapter, tok, cfg, str(tmp_path / "alone"), base_path=base, self_contained=True)
    shutil.rmtree(base)  # the original base is gone
    emb = GEMEmbedder.from_pretrained(path, backend="sdpa")
    assert emb.base_path == os.path.join(path, "base") and torch.equal(emb.encode(TEXTS), ref)
    peft = PeftModel.from_pretrained(use_gem_attention(AutoModelForCausalLM.from_pretrained(os.path.join(path, "base")), backend="sdpa"), path)
    batch = emb._batch([tok(t)["input_ids"] for t in TEXTS], "right")
    with torch.no_grad():
        hidden = peft(**batch, use_cache=False, output_hidden_states=True).hidden_states[-1]
    got = F.normalize(pool_special_states(hidden, batch["roles"], batch["doc_ids"], len(TEXTS)), dim=-1)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
