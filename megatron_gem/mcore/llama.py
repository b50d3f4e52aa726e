"""Llama-family GPTModel for megatron-core with GEM attention.

Pieces
  LlamaArch            the architecture read from an HF config (Llama, Llama-3/3.1/3.2, Mistral);
                       anything else is refused with the reason.
  transformer_config   megatron-core TransformerConfig for it (TP/PP/SP/recompute/dtype).
  gem_layer_spec       megatron-core's GPT layer spec with GEMCoreAttention as ``core_attention``:
                       the local spec with an HF-exact RMSNorm (or apex's fused one), or the
                       TransformerEngine spec (mcore/fused.py chooses; the converter and tests
                       build the local one).
  GEMGPTModel          (gpt_model.py, built by its build_gem_gpt_model from the pieces here)
                       GPTModel whose RoPE follows the batch's position_ids (packed documents
                       restart at 0, as in the HF model) and whose ``forward(..., task="embed")``
                       returns last-layer states for the summary readout.

Conventions (why no RoPE permutation is needed): HF Llama checkpoints store Q/K already in
the "rotate half" layout (HF's conversion script permuted Meta's interleaved weights once);
megatron-core's ``rotary_interleaved=False`` is the same rotate-half rule, so Q/K rows map
unchanged. The Llama-3 frequency rescaling (``rope_type: llama3``) is computed here from the
checkpoint's own factor / low_freq_factor / high_freq_factor / original_max_position_embeddings
(megatron-core hard-codes 1, 4 and 8192 there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is not a Llama-family model this backend can represent exactly."""


@dataclass
class LlamaArch:
    """What megatron-core needs to build the model, taken from an HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 parameters, None for plain RoPE
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaArch":
        return cls(**d)


def _rope_params(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    # Older transformers: rope_theta + rope_scaling at the top level.
    d = dict(getattr(hf_config, "rope_scaling", None) or {})
    d.setdefault("rope_type", d.pop("type", "default"))
    d["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return d


def arch_from_hf_config(hf_config) -> LlamaArch:
    """Read and check an HF config; raise UnsupportedModelError naming what does not fit."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    name = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if name is None and not archs and model_type in ("llama", "mistral"):
        name = "LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM"
    if name is None:
        raise UnsupportedModelError(
            f"architecture {archs or model_type!r} is not supported by the megatron-core backend; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1/3.2, Mistral). Use the DeepSpeed path for other models."
        )

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{name}: {what} is not supported by the megatron-core GEM backend")

    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={hf_config.hidden_act!r} (SwiGLU with silu only)")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise refuse("attention_bias/mlp_bias=True")
    rope = _rope_params(hf_config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise refuse(f"rope_type={rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise refuse(f"partial_rotary_factor={hf_config.partial_rotary_factor}")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rope]
        if missing:
            raise refuse(f"llama3 rope scaling without {missing}")
        scaling = {k: float(rope[k]) for k in keys}
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return LlamaArch(
        architecture=name,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=hf_config.max_position_embeddings,
        sliding_window=getattr(hf_config, "sliding_window", None) if name == "MistralForCausalLM" else None,
    )


def check_parallel_sizes(arch: LlamaArch, tp: int, pp: int) -> None:
    """Raise ValueError (with the numbers) when the model cannot be split this way."""
    if arch.num_attention_heads % tp or arch.num_key_value_heads % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide the attention heads ({arch.num_attention_heads}) and key/value heads ({arch.num_key_value_heads})"
        )
    if arch.intermediate_size % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide intermediate_size {arch.intermediate_size}")
    if arch.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} must divide the number of layers ({arch.num_layers})")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: pad to a multiple of divisible_by x TP (each TP rank gets an equal
    slice of the embedding and LM head)."""
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def inv_freq(arch: LlamaArch) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2] (fp32), with Llama-3 rescaling when configured;
    the same formula as transformers' default and llama3 rope initialisers."""
    dim = arch.head_dim
    freqs = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = arch.rope_scaling
    if s is None:
        return freqs
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / s["factor"], freqs)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(torch.nn.Module):
    """RMSNorm computed like HF Llama's (fp32 statistics, weight applied in the input dtype).

    megatron-core's torch fallback norm refuses sequence parallelism; this one marks its weight
    ``sequence_parallel`` under SP so megatron-core all-reduces its gradient over the TP group
    (each rank normalises only its slice of the sequence)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class FusedRMSNorm(RMSNorm):
    """RMSNorm through apex's fused CUDA kernel (one kernel instead of a chain of elementwise ones):
    the same parameter, so the same state dict and checkpoints as RMSNorm. Statistics in fp32 as
    in RMSNorm; the weight is applied before the result is rounded to the input dtype, where HF
    rounds first, so in bf16 an output may differ from RMSNorm's in its last bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .fused import apex_rms_norm

        return apex_rms_norm()(x, self.weight, self.weight.shape, self.eps)


def transformer_config(
    arch: LlamaArch,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    layer_impl: str = "local",
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_parallel_sizes(arch, tensor_model_parallel_size, pipeline_model_parallel_size)
    bf16 = params_dtype == torch.bfloat16
    fp16 = params_dtype == torch.float16
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    if recompute_granularity == "full" and recompute_method is None:
        recompute_method, recompute_num_layers = "uniform", 1
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=False,  # weights always come from a checkpoint
        transformer_impl="transformer_engine" if layer_impl == "transformer_engine" else "local",
    )


def gem_layer_spec(*, backend: str = "auto", suffix_sees_bos: bool = False, layer_impl: str = "local", sliding_window: int | None = None):
    """megatron-core's GPT layer spec of ``layer_impl`` (mcore/fused.py) with the GEM core
    attention: "local" (HF-exact RMSNorm), "apex" (the local spec, apex's fused RMSNorm) or
    "transformer_engine" (megatron-core's TE spec: the norms fused into linear_qkv / linear_fc1).
    ``sliding_window``: Mistral's window, executed by the GEM attention; None without one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ..attention.megatron import GEMCoreAttention

    if layer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        norm = FusedRMSNorm if layer_impl == "apex" else RMSNorm
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    attn = spec.submodules.self_attention
    attn.params = {**attn.params, "attn_mask_type": AttnMaskType.arbitrary}
    attn.submodules.core_attention = ModuleSpec(
        module=GEMCoreAttention, params={"backend": backend, "suffix_sees_bos": suffix_sees_bos, "sliding_window": sliding_window}
    )
    return spec


def gem_block_spec(config, *, backend: str = "auto", suffix_sees_bos: bool = False, layer_impl: str = "local", sliding_window: int | None = None):
    """This pipeline stage's TransformerBlock spec: GEM layers and the matching final norm
    (megatron-core's default final norm for the local spec is the torch fallback, which refuses
    sequence parallelism)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = gem_layer_spec(backend=backend, suffix_sees_bos=suffix_sees_bos, layer_impl=layer_impl, sliding_window=sliding_window)
    if layer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = FusedRMSNorm if layer_impl == "apex" else RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=final_norm)
