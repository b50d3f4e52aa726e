"""Adding GEM to pipelines users already have: HF Trainer, TRL, sentence-transformers, mteb,
and their own megatron-core pretrain scripts. Guide: docs/integrations.md.

  enable_gem / disable_gem          any HF causal LM (megatron_gem.integrations.enable)
  GEMDataCollator                   GEM layouts, labels, packing for Trainer / TRL
  GEMTrainer, gem_trainer_class,    the contrastive phase in a Trainer (or SFTTrainer) subclass
  GEMPhaseCallback
  save_gem_adapter, load_gem_adapter   summary mode: the adapter folder of an enable_gem'd model
  save_sentence_transformer         a GEM checkpoint that loads as SentenceTransformer(path)
  megatron_lm                       model_provider / forward_step for megatron-core scripts

Importing this package imports transformers (not megatron-core, not sentence-transformers).
"""

from .collator import GEMDataCollator
from .enable import disable_gem, enable_gem, is_gem_enabled
from .gem_adapter import load_gem_adapter, save_gem_adapter

__all__ = [
    "GEMDataCollator",
    "GEMPhaseCallback",
    "GEMTrainer",
    "GEMTrainerMixin",
    "disable_gem",
    "enable_gem",
    "gem_trainer_class",
    "is_gem_enabled",
    "load_gem_adapter",
    "save_gem_adapter",
    "save_sentence_transformer",
]


def __getattr__(name):
    # Trainer classes import transformers' Trainer (accelerate); the exporter sentence-transformers.
    if name in ("GEMTrainer", "GEMTrainerMixin", "GEMPhaseCallback", "gem_trainer_class"):
        from . import hf_trainer

        return getattr(hf_trainer, name)
    if name == "save_sentence_transformer":
        from .sentence_transformers import save_sentence_transformer

        return save_sentence_transformer
    raise AttributeError(f"module 'megatron_gem.integrations' has no attribute {name!r}")
