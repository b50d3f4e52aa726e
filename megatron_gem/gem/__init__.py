"""The GEM method in plain PyTorch: roles, layouts, the mask rule, labels, losses, tokens.

Imports nothing else of megatron_gem and no training framework.
"""

from .config import CONFIG_NAME, GEMConfig
from .layout import build_layout, draw_layout, next_token_labels, position_ids_from_doc_ids, prefix_dropout
from .mask import allowed, flex_mask_mod, gem_mask
from .roles import IGNORE_INDEX, PAD_DOC_ID, Role

__all__ = [
    "CONFIG_NAME",
    "GEMConfig",
    "IGNORE_INDEX",
    "PAD_DOC_ID",
    "Role",
    "allowed",
    "build_layout",
    "draw_layout",
    "flex_mask_mod",
    "gem_mask",
    "next_token_labels",
    "position_ids_from_doc_ids",
    "prefix_dropout",
]
