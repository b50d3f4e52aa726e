"""The HF transformers side of the models layer: the trained module (an HF causal LM plus the
InfoNCE logit scale), loading it, and making it a GEM model. Beside it, megatron_gem/mcore/
holds the megatron-core side."""
