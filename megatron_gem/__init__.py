"""megatron-gem: GEM (generation + embedding) post-training for decoder-only LLMs.

Public API:
  Role, GEMConfig, gem_mask      the method (megatron_gem.gem)
  gem_attention                  the rule executed by a backend (sdpa | flex | triton)
  GEMEmbedder                    readout of embeddings from a GEM checkpoint
  enable_gem, disable_gem        GEM on any HF causal LM (see megatron_gem.integrations)
"""

from .attention.dispatch import gem_attention
from .gem import GEMConfig, Role, gem_mask
from .integrations.enable import disable_gem, enable_gem

__version__ = "0.1.0"

__all__ = ["GEMConfig", "GEMEmbedder", "Role", "disable_gem", "enable_gem", "gem_attention", "gem_mask", "__version__"]


def __getattr__(name):
    # The embedder pulls in transformers; import it only when asked for.
    if name == "GEMEmbedder":
        from .embedder import GEMEmbedder

        return GEMEmbedder
    raise AttributeError(f"module 'megatron_gem' has no attribute {name!r}")
