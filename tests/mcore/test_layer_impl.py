"""The megatron-core layer implementation chosen from the fused kernels a machine has
(mcore/fused.py), on CPU by faking what imports; the specs it selects keep the GEM attention,
and TransformerEngine's parameter names map back to the local spec's (megatron-core's own key
map is the oracle). Building the apex variant and its logits: test_convert.py (worker)."""

import sys
import types

import pytest

from megatron_gem.mcore.fused import choose_layer_impl, fused_kernels_available
from megatron_gem.mcore.hf_mapping import global_name


@pytest.mark.parametrize(
    "cuda, te, apex, summary, expected",
    [
        (True, True, True, False, "transformer_engine"),
        (True, True, False, False, "transformer_engine"),
        (True, False, True, False, "apex"),
        (True, False, False, False, "local"),
        (True, True, True, True, "apex"),  # summary mode: the deltas need the norm outside the linear
        (True, True, False, True, "local"),
        (False, True, True, False, "local"),  # no GPU: the fused kernels cannot run
    ],
)
def test_choice(cuda, te, apex, summary, expected):
    impl = choose_layer_impl({"cuda": cuda, "transformer_engine": te, "apex": apex}, summary_mode=summary)
    assert impl.name == expected
    assert impl.describe().startswith(f"layers: {expected} (")
    if te and summary and cuda:
        assert "summary mode" in impl.why


def test_this_machine_and_a_pypi_apex_decoy(monkeypatch):
    import torch

    found = fused_kernels_available()
    assert set(found) == {"cuda", "transformer_engine", "apex"} and found["cuda"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert choose_layer_impl(found).name == "local"
    # PyPI's unrelated "apex" package imports as `apex` but has no apex.normalization.
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.delitem(sys.modules, "apex.normalization", raising=False)
    monkeypatch.delitem(sys.modules, "apex.normalization.fused_layer_norm", raising=False)
    assert fused_kernels_available()["apex"] is False


def test_specs_keep_the_gem_attention_and_their_norms():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_gem.attention.megatron import GEMCoreAttention
    from megatron_gem.mcore.llama import FusedRMSNorm, RMSNorm, gem_layer_spec

    for impl, norm in (("local", RMSNorm), ("apex", FusedRMSNorm)):
        sub = gem_layer_spec(backend="sdpa", layer_impl=impl).submodules
        assert sub.input_layernorm is norm and sub.pre_mlp_layernorm is norm
        attn = sub.self_attention
        assert attn.submodules.core_attention.module is GEMCoreAttention and attn.submodules.core_attention.params["backend"] == "sdpa"
        assert attn.params["attn_mask_type"] == AttnMaskType.arbitrary


def test_transformer_engine_names_map_back_to_the_local_spec():
    """megatron-core declares which local-spec name each TE name is (the local spec's
    sharded_state_dict_keys_map, used for dist checkpoints); hf_mapping must agree, so a TE
    model loads and exports HF weights under the same names as the local one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    local_names = [
        "input_layernorm.weight",
        "pre_mlp_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    mapped = 0
    for local in local_names:
        te = next((new + local[len(old) :] for old, new in keys_map.items() if local.startswith(old)), local)
        mapped += te != local
        assert global_name(f"decoder.layers.1.{te}", [0, 7]) == f"decoder.layers.7.{local}", (local, te)
    assert mapped == 2  # the two norms TE fuses into linear_qkv and linear_fc1
    assert global_name("decoder.final_layernorm.weight", [0]) == "decoder.final_layernorm.weight"
