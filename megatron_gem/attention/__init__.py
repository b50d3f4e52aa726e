"""How the GEM rule is executed: backends (dispatch) and framework adapters (hf, megatron)."""

from .dispatch import BACKENDS, gem_attention

__all__ = ["BACKENDS", "gem_attention"]
