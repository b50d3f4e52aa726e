"""HF <-> megatron-core mapping pieces, in-process (no torch.distributed, no megatron runtime)."""

import pytest
import torch

from megatron_gem.mcore.hf_mapping import interleave_qkv, shard, split_qkv, unshard
from megatron_gem.mcore.llama import UnsupportedModelError, arch_from_hf_config, check_parallel_sizes, inv_freq, padded_vocab_size


def _arch(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    return arch_from_hf_config(LlamaConfig(**cfg))


def test_qkv_interleave_layout_and_inverse():
    arch = _arch()  # 4 query heads, 2 groups, head_dim 8
    D, h = 8, 32
    q = torch.arange(4 * D)[:, None].float().expand(-1, h) + 1000
    k = torch.arange(2 * D)[:, None].float().expand(-1, h) + 2000
    v = torch.arange(2 * D)[:, None].float().expand(-1, h) + 3000
    qkv = interleave_qkv(q, k, v, arch)
    assert qkv.shape == (8 * D, h)
    # group 0: query heads 0 and 1, then key head 0, then value head 0; group 1 likewise
    expect = torch.cat([q[0:D], q[D : 2 * D], k[0:D], v[0:D], q[2 * D : 3 * D], q[3 * D :], k[D:], v[D:]])
    assert torch.equal(qkv, expect)
    q2, k2, v2 = split_qkv(qkv, arch)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_tp_shards_hold_whole_groups_and_swiglu_halves():
    full_fc1 = torch.arange(8 * 3).float().reshape(8, 3)  # [gate(4); up(4)]
    s0, s1 = (shard("decoder.layers.0.mlp.linear_fc1.weight", full_fc1, r, 2) for r in (0, 1))
    assert torch.equal(s0, torch.cat([full_fc1[0:2], full_fc1[4:6]]))
    assert torch.equal(s1, torch.cat([full_fc1[2:4], full_fc1[6:8]]))
    assert torch.equal(unshard("decoder.layers.0.mlp.linear_fc1.weight", [s0, s1]), full_fc1)
    proj = torch.randn(6, 8)
    parts = [shard("decoder.layers.3.self_attention.linear_proj.weight", proj, r, 2) for r in (0, 1)]
    assert parts[0].shape == (6, 4) and torch.equal(unshard("decoder.layers.3.self_attention.linear_proj.weight", parts), proj)
    norm = torch.randn(8)
    assert shard("decoder.final_layernorm.weight", norm, 1, 2) is norm


def test_vocab_padding_rule():
    assert padded_vocab_size(128256, 1) == 128256
    assert padded_vocab_size(128256 + 1, 8) == 129024  # next multiple of 128 x 8
    assert padded_vocab_size(320, 2, divisible_by=1) == 320
    assert padded_vocab_size(321, 2, divisible_by=1) == 322


def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for extra in ({}, {"rope_scaling": scaling, "rope_theta": 500000.0, "max_position_embeddings": 131072}):
        cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, **extra)
        rope_type = cfg.rope_parameters["rope_type"]
        if rope_type == "default":
            base = cfg.rope_parameters["rope_theta"]
            ref = 1.0 / (base ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
        else:
            ref, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        ours = inv_freq(arch_from_hf_config(cfg))
        assert torch.equal(ours, ref.float()), rope_type
    # The scaling really changes frequencies (the test above would catch a dropped rope_scaling).
    assert not torch.equal(
        inv_freq(
            arch_from_hf_config(
                LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_scaling=scaling, rope_theta=500000.0, max_position_embeddings=131072)
            )
        ),
        inv_freq(arch_from_hf_config(LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0))),
    )


def test_refuses_unknown_architectures_and_features():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        arch_from_hf_config(GPT2Config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match="not supported"):
        arch_from_hf_config(Qwen2Config(architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn'"):
        arch_from_hf_config(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}))
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        arch_from_hf_config(LlamaConfig(attention_bias=True))
    mistral = arch_from_hf_config(MistralConfig(architectures=["MistralForCausalLM"]))
    assert mistral.architecture == "MistralForCausalLM" and mistral.num_key_value_heads == 8 and mistral.rope_theta == 10000.0


def test_parallel_size_checks():
    arch = _arch()
    check_parallel_sizes(arch, 2, 2)
    with pytest.raises(ValueError, match="key/value heads"):
        check_parallel_sizes(arch, 4, 1)
    with pytest.raises(ValueError, match="number of layers"):
        check_parallel_sizes(arch, 1, 4)


def test_summary_adapter_targets_and_hf_mapping():
    """Fused megatron deltas -> HF q/k/v and gate/up deltas (A shared, B rows like the weights);
    the TP split of A/B follows the adapted layer's weight."""
    from megatron_gem.mcore.summary import hf_adapter_tensors, megatron_targets

    assert megatron_targets([]) == ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    assert megatron_targets(["q_proj", "k_proj", "v_proj", "down_proj"]) == ["self_attention.linear_qkv", "mlp.linear_fc2"]
    assert megatron_targets(["linear_fc1"]) == ["mlp.linear_fc1"]
    with pytest.raises(ValueError, match="fuses q_proj/k_proj/v_proj into linear_qkv"):
        megatron_targets(["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="unknown"):
        megatron_targets(["lm_head"])
    arch = _arch()  # h 32, 4 query heads / 2 groups, head_dim 8, intermediate 48
    g = torch.Generator().manual_seed(0)
    r = 3
    q, k, v = (torch.randn(n, r, generator=g) for n in (32, 16, 16))
    a = torch.randn(r, 32, generator=g)
    out = hf_adapter_tensors("decoder.layers.1.self_attention.linear_qkv", a, interleave_qkv(q, k, v, arch), arch)
    assert sorted(out) == [f"model.layers.1.self_attn.{p}_proj.lora_{w}.weight" for p in "kqv" for w in "AB"]
    assert torch.equal(out["model.layers.1.self_attn.q_proj.lora_B.weight"], q) and torch.equal(out["model.layers.1.self_attn.v_proj.lora_B.weight"], v)
    assert all(torch.equal(out[f"model.layers.1.self_attn.{p}_proj.lora_A.weight"], a) for p in "qkv")
    x = torch.randn(5, 32, generator=g)  # the fused delta's output blocks are the per-projection deltas
    fused = x @ a.t() @ interleave_qkv(q, k, v, arch).t()
    assert torch.allclose(torch.cat([x @ a.t() @ t.t() for t in (q, k, v)], 1), torch.cat(split_qkv(fused.t().contiguous(), arch), 0).t(), atol=1e-6)
    gate, up = torch.randn(48, r, generator=g), torch.randn(48, r, generator=g)
    fc1 = hf_adapter_tensors("decoder.layers.0.mlp.linear_fc1", torch.randn(r, 32, generator=g), torch.cat([gate, up]), arch)
    assert torch.equal(fc1["model.layers.0.mlp.gate_proj.lora_B.weight"], gate) and torch.equal(fc1["model.layers.0.mlp.up_proj.lora_B.weight"], up)
    proj = hf_adapter_tensors("decoder.layers.0.self_attention.linear_proj", a, torch.randn(32, r, generator=g), arch)
    assert sorted(proj) == ["model.layers.0.self_attn.o_proj.lora_A.weight", "model.layers.0.self_attn.o_proj.lora_B.weight"]
    # TP: column-parallel B shards like the weight's rows (fc1: [gate slice; up slice]), row-parallel A like its columns
    b_fc1 = torch.cat([gate, up])
    s0, s1 = (shard("decoder.layers.0.mlp.linear_fc1.weight", b_fc1, i, 2) for i in (0, 1))
    assert torch.equal(s0, torch.cat([gate[:24], up[:24]])) and torch.equal(unshard("decoder.layers.0.mlp.linear_fc1.weight", [s0, s1]), b_fc1)
    a0 = shard("decoder.layers.0.self_attention.linear_proj.weight", a, 0, 2)
    assert torch.equal(a0, a[:, :16])


def test_summary_mode_refuses_sequence_parallel(tiny_tokenizer):
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.mcore.provider import build_gem_model

    with pytest.raises(ValueError, match="--gem-train summary does not support --sequence-parallel"):
        build_gem_model("unused", tiny_tokenizer, GEMConfig(train_mode="summary"), tp=2, pp=1, sequence_parallel=True)


def test_a_sequence_longer_than_the_checkpoint_positions_is_refused(tiny_inputs, tiny_tokenizer):
    """build_gem_model's ``seq_length`` (Megatron-LM's provider path has no train.py flag check)."""
    from transformers import AutoConfig

    from megatron_gem.common.errors import ModelLoadError
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.mcore.provider import build_gem_model

    limit = AutoConfig.from_pretrained(tiny_inputs["model"]).max_position_embeddings
    with pytest.raises(ModelLoadError, match=f"--seq-length {limit + 1} is above --model .*max_position_embeddings {limit}"):
        build_gem_model(tiny_inputs["model"], tiny_tokenizer, GEMConfig(), tp=1, pp=1, seq_length=limit + 1)
