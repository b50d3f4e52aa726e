"""An HF checkpoint as the source of a megatron-core GEM model: its architecture, and a weight
getter with the GEM token rows added (the method's own add_gem_tokens on just the embedding
and untied head, so no rank loads the whole HF model)."""

from __future__ import annotations

import torch

from ..common.errors import ModelLoadError
from ..gem.tokens import add_gem_tokens, summary_token_ids
from .hf_mapping import HFWeights
from .llama import arch_from_hf_config


class _EmbeddingTables(torch.nn.Module):
    """Just the embedding (and untied LM head) of an HF checkpoint, with the interface
    gem.tokens.add_gem_tokens uses, so GEM tokens are added by the method's own code without
    loading the whole model on every rank."""

    def __init__(self, embed: torch.Tensor, head: torch.Tensor | None):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(embed.clone(), freeze=False)
        self.head = None
        if head is not None:
            self.head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype)
            self.head.weight = torch.nn.Parameter(head.clone())

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def resize_token_embeddings(self, n: int, mean_resizing: bool = False):
        def grow(w: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.cat([w.data, w.data.new_zeros(n - w.shape[0], w.shape[1])]))

        self.embed.weight = grow(self.embed.weight)
        if self.head is not None:
            self.head.weight = grow(self.head.weight)


def check_summary_ids_fit(path: str, ids, vocab: int) -> None:
    if max(ids) >= vocab:
        raise ModelLoadError(f"--model {path}: summary token id(s) {ids} lie beyond the model's {vocab} embedding rows (summary mode adds no rows)")


def load_hf_source(path: str, tokenizer, gem_config):
    """(arch, HF config dict, weight getter, vocab) of an HF checkpoint, GEM tokens added (summary
    mode: existing tokens named, no rows added; gem.tokens.summary_token_ids)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {path}: cannot read an HF config ({e})") from e
    arch = arch_from_hf_config(hf_config)
    weights = HFWeights(path)
    if gem_config.summary_mode:
        summary_token_ids(tokenizer, gem_config)
        vocab = weights.info("model.embed_tokens.weight")[0][0]
        check_summary_ids_fit(path, gem_config.special_token_ids, vocab)
        arch.vocab_size = vocab
        return arch, hf_config.to_dict(), weights, vocab
    head = None if arch.tie_word_embeddings else weights("lm_head.weight")
    tables = _EmbeddingTables(weights("model.embed_tokens.weight"), head)
    add_gem_tokens(tables, tokenizer, gem_config)
    with torch.no_grad():
        weights.overrides["model.embed_tokens.weight"] = tables.embed.weight.detach()
        if head is not None:
            weights.overrides["lm_head.weight"] = tables.head.weight.detach()
    vocab = tables.embed.weight.shape[0]
    arch.vocab_size = vocab
    return arch, hf_config.to_dict(), weights, vocab
