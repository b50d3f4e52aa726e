"""Conversion: converted models give the HF logits; HF -> Megatron -> HF is bit-equal."""

import json

import pytest
import torch
from megatron_launch import run_python, run_torchrun


def test_megatron_logits_equal_hf(tmp_path):
    """Single process: tiny Llama configs (GQA untied, tied, Llama-3 rope scaling, MHA) and a
    Mistral, packed GEM batch, logits of the converted megatron-core model vs HF."""
    out = tmp_path / "eq.json"
    run_torchrun(["tests/megatron/megatron_worker.py", "equivalence", str(out)])
    r = json.loads(out.read_text())
    for name in ("untied_gqa", "tied", "llama3_rope_scaling", "mha_3layers", "mistral"):
        assert r[name]["max_abs_diff"] <= 1e-5 * max(1.0, r[name]["ref_scale"]), (name, r[name])
        assert r[name]["padding_is_masked"], name
    assert r["llama3_without_scaling_diff"] > 1e-3  # the comparison is sensitive to rope scaling


def test_round_trip_bit_equal_and_tp2_pp2_load(gem_hf_checkpoint, converted_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.gem.config import GEMConfig

    meta = json.loads((converted_checkpoint / "megatron_gem.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["pipeline_model_parallel_size"] == 2
    vocab = meta["vocab_size"]
    assert meta["padded_vocab_size"] % (128 * 2) == 0 and meta["padded_vocab_size"] > vocab
    back = tmp_path / "hf_back"
    run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(converted_checkpoint), "--output", str(back)])
    a = load_file(gem_hf_checkpoint / "model.safetensors")
    b = load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert GEMConfig.load(back).special_token_ids == GEMConfig.load(gem_hf_checkpoint).special_token_ids
    assert len(AutoTokenizer.from_pretrained(back)) == vocab
    AutoModelForCausalLM.from_pretrained(back)  # loads as a plain HF model

    # The same dist checkpoint loaded at TP=2 x PP=2 (4 processes) gives the HF logits.
    import sys

    sys.path.insert(0, "tests/megatron")
    from megatron_worker import hf_logits, packed_batch

    hf = AutoModelForCausalLM.from_pretrained(gem_hf_checkpoint)
    batch = packed_batch(vocab, seed=1)
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun(["tests/megatron/megatron_worker.py", "load_logits", str(converted_checkpoint), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")], nproc=4)
    got = torch.load(tmp_path / "logits.pt")
    ref = hf_logits(hf, *batch)
    assert got.shape[-1] == meta["padded_vocab_size"]
    assert torch.allclose(got[..., :vocab], ref, atol=1e-5, rtol=1e-5), float((got[..., :vocab] - ref).abs().max())


def test_refuses_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    import convert_checkpoint  # tools/ is on sys.path (conftest); the refusal comes before megatron-core starts

    assert convert_checkpoint.main(["hf-to-megatron", "--input", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "not supported" in err
    assert not (tmp_path / "out").exists()
    assert convert_checkpoint.main(["megatron-to-hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2


def test_add_gem_tokens_tool(gem_hf_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megatron_gem.gem.config import GEMConfig

    cfg = GEMConfig.load(gem_hf_checkpoint)
    tok = AutoTokenizer.from_pretrained(gem_hf_checkpoint)
    assert tok.convert_tokens_to_ids(cfg.special_tokens) == cfg.special_token_ids
    w = load_file(gem_hf_checkpoint / "model.safetensors")
    emb, head = w["model.embed_tokens.weight"], w["lm_head.weight"]
    (gid,) = cfg.special_token_ids
    assert torch.allclose(emb[gid], emb[:gid].mean(0), atol=1e-6) and torch.allclose(head[gid], head[:gid].mean(0), atol=1e-6)
    import add_gem_tokens  # on sys.path via the fixture

    assert add_gem_tokens.main(["--input", str(gem_hf_checkpoint), "--output", str(tmp_path / "again")]) == 0  # idempotent
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")["model.embed_tokens.weight"], emb)
    with pytest.raises(SystemExit):
        add_gem_tokens.main(["--output", "x"])
