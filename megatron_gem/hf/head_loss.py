"""The next-token loss of an HF causal LM through its LM head without full logits
(gem/lm_head_loss.py), as a module of its own so that ZeRO-3 treats its call like the head's.

ZeRO-3 gathers a partitioned weight only around the forward (and backward) of a module that
owns it, or of one it is registered with as an "external parameter" (DeepSpeed's
``register_external_parameter``). The chunked loss reads the head's weight outside the head's
own forward, so the weight is registered with this module: gathered for its forward, again for
its backward (recomputation of the logits blocks), and released after, as it is around
``lm_head(hidden)``. Without ZeRO-3 this is a plain function call.
"""

from __future__ import annotations

import torch

from ..gem.lm_head_loss import lm_head_token_losses


class LMHeadLosses(torch.nn.Module):
    """``losses(hidden [..., H], labels [...])`` -> per-token next-token cross-entropy (fp32,
    0 where ignored) of ``lm``'s output embedding. ``vocab_limit``: ids at and beyond it are
    padding rows (gem.tokens.pad_vocab_rows), never in the softmax. Holds no parameter of its
    own (the head stays ``lm``'s; nothing is added to the state dict)."""

    def __init__(self, lm, *, vocab_limit: int | None = None, chunk_tokens: int | None = None, chunk_vocab: int | None = None):
        super().__init__()
        self._output_embeddings = lm.get_output_embeddings  # a method, not a submodule: the head is lm's
        self.vocab_limit = vocab_limit
        self.chunk_tokens, self.chunk_vocab = chunk_tokens, chunk_vocab
        self._registered: set[int] = set()

    def head_weight(self) -> torch.nn.Parameter:
        head = self._output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError("the model has no output embedding (LM head) weight; GEM's next-token loss needs a causal LM head")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"the LM head {type(head).__name__} has a bias; GEM's chunked next-token loss supports bias-free heads (Llama / Mistral)")
        return head.weight

    def __call__(self, *args, **kwargs):
        # Before the module's hooks run: ZeRO-3's pre-forward hook gathers what is registered.
        weight = self.head_weight()
        if hasattr(weight, "ds_id") and id(weight) not in self._registered:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)
            self._registered.add(id(weight))
        return super().__call__(*args, **kwargs)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_head_token_losses(
            hidden, self.head_weight(), labels, vocab_limit=self.vocab_limit, chunk_tokens=self.chunk_tokens, chunk_vocab=self.chunk_vocab
        )
