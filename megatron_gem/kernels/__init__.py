"""Fast paths for executing the GEM rule.

  block_table            which (query block, key block) tiles hold allowed pairs (torch only)
  gem_attention_triton   the block-sparse Triton attention: forward, backward, registered as the
                         torch.library ops megatron_gem::gem_attention_fwd / _bwd (fake impls, autograd)

``triton_gem_attention`` is what megatron_gem.gem_attention(..., backend="triton") calls.
"""

from .block_table import GemBlockTable, allowed_pair_count, build_block_table, classify_blocks, placeholder_block_table


def __getattr__(name):
    # Triton is imported only when the kernel is asked for (the block table needs torch only).
    if name in ("triton_gem_attention", "gem_attention_fwd", "gem_attention_bwd", "default_launch_config"):
        from . import gem_attention_triton

        return getattr(gem_attention_triton, name)
    raise AttributeError(f"module 'megatron_gem.kernels' has no attribute {name!r}")


__all__ = [
    "GemBlockTable",
    "allowed_pair_count",
    "build_block_table",
    "classify_blocks",
    "default_launch_config",
    "gem_attention_bwd",
    "gem_attention_fwd",
    "placeholder_block_table",
    "triton_gem_attention",
]
