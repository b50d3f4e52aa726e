"""megatron-gem: GEM (generation + embedding) post-training for decoder-only LLMs.

Public API:
  Role, GEMConfig, gem_mask      the method (megatron_gem.gem)
  gem_attention                  the rule executed by a backend (sdpa | flex | triton)
  GEMEmbedder                    readout of embeddings from a GEM checkpoint
"""

from .attention.dispatch import gem_attention
from .gem import GEMConfig, Role, gem_mask

__version__ = "0.1.0"

__all__ = ["GEMConfig", "GEMEmbedder", "Role", "gem_attention", "gem_mask", "__version__"]


def __getattr__(name):
    # The embedder pulls in transformers; import it only when asked for.
    if name == "GEMEmbedder":
        from .embedder import GEMEmbedder

        return GEMEmbedder
    raise AttributeError(f"module 'megatron_gem' has no attribute {name!r}")
