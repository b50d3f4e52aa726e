"""Which fused kernels this machine has, and the layer implementation the megatron-core GEM model
takes from them (docs/megatron.md, "Layer implementations").

NGC containers (the usual cluster image) ship TransformerEngine and apex; a pip environment has
neither. The choice, made once at build time and said in the start-up banner:

  transformer_engine  megatron-core's TransformerEngine layer spec: TE's fused RMSNorm + linear
                      (TELayerNormColumnParallelLinear), TE linears; GEM core attention
  apex                the local spec with apex's fused RMSNorm kernel (llama.FusedRMSNorm)
  local               the local spec with the HF-exact Python RMSNorm (llama.RMSNorm)

The GEM core attention (attention/megatron.py) is the attention of every one of them. Summary
mode never takes the TE spec: its deltas read the normalised input of linear_qkv / linear_fc1,
which TE's fused layernorm-linear computes inside one kernel and never exposes. Adam: megatron-
core's optimizer itself imports TE's FusedAdam, else apex's, else torch's AdamW (megatron/core/
optimizer/__init__.py); the engine's banner names the class it got.

``fused_kernels_available`` is the one place that asks the environment; tests replace it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

LAYER_IMPLS = ("transformer_engine", "apex", "local")


def fused_kernels_available() -> dict[str, bool]:
    """{"cuda", "transformer_engine", "apex"}: whether each is usable here. apex counts only as
    NVIDIA's (its ``apex.normalization`` with the fused RMSNorm; PyPI's "apex" is another
    project), TransformerEngine only with its PyTorch module."""
    import torch

    def imports(module: str, attr: str | None = None) -> bool:
        try:
            m = importlib.import_module(module)
        except Exception:  # ImportError, or a broken CUDA extension raising at import
            return False
        return attr is None or hasattr(m, attr)

    return {
        "cuda": torch.cuda.is_available(),
        "transformer_engine": imports("transformer_engine.pytorch"),
        "apex": imports("apex.normalization.fused_layer_norm", "fused_rms_norm_affine"),
    }


@dataclass(frozen=True)
class LayerImpl:
    name: str  # one of LAYER_IMPLS
    why: str  # one line for the start-up banner

    def describe(self) -> str:
        return f"layers: {self.name} ({self.why})"


def choose_layer_impl(available: dict[str, bool], *, summary_mode: bool = False) -> LayerImpl:
    """The layer implementation for what ``available`` (fused_kernels_available) reports."""
    if not available.get("cuda"):
        return LayerImpl("local", "no GPU: the fused kernels are CUDA kernels")
    te, apex = available.get("transformer_engine"), available.get("apex")
    if te and not summary_mode:
        return LayerImpl("transformer_engine", "transformer_engine imports: TE's fused RMSNorm+linear and linears; GEM attention")
    skipped = "; transformer_engine imports, but summary mode's deltas need the norm outside the linear" if te else ""
    if apex:
        return LayerImpl("apex", f"apex imports: its fused RMSNorm kernel{skipped}")
    return LayerImpl("local", f"neither transformer_engine nor apex imports: Python RMSNorm{skipped}")


def apex_rms_norm():
    """apex's fused RMSNorm function ``(input, weight, normalized_shape, eps)`` (a seam: tests
    put a stand-in here, since apex needs a GPU)."""
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine
