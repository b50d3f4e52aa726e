"""GEMGPTModel: megatron-core's GPTModel with what GEM needs (its own module so that importing
megatron_gem.mcore.llama does not import megatron-core)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from ..gem.losses import LogitScale
from .llama import LlamaArch, inv_freq


class GEMGPTModel(GPTModel):
    """GPTModel + GEM: RoPE by position_ids, ``task="embed"`` readout of last-layer states,
    the learnable InfoNCE logit scale (last pipeline stage), padded vocabulary columns
    excluded from the softmax."""

    def __init__(self, *args, arch: LlamaArch, true_vocab_size: int, logit_scale_init=20.0, logit_scale_max=100.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.arch = arch
        self.true_vocab_size = true_vocab_size
        self.register_buffer("gem_inv_freq", inv_freq(arch), persistent=False)
        if self.post_process:
            # In the model's parameter dtype, like every megatron-core parameter (Megatron-LM's
            # Float16Module casts it so too): megatron-core's mixed-precision optimizers keep the
            # fp32 master copy, and their checkpoint formats assume one dtype per trained
            # parameter set (an fp32 scale among bf16 parameters breaks both optimizers' save).
            self.logit_scale = LogitScale(logit_scale_init, logit_scale_max).to(self.config.params_dtype)

    def _rope_from_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        # [B, L] -> [L, B, 1, head_dim] angles in fp32, "rotate half" layout (cat of two halves).
        angles = position_ids.float()[..., None] * self.gem_inv_freq.to(position_ids.device)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()

    def forward(self, input_ids, position_ids, attention_mask, *, ntp_rows: int | None = None, labels: torch.Tensor | None = None):
        """One packed GEM micro-batch. ``attention_mask`` = gem_mask_info(doc_ids, roles).

        Last pipeline stage: ``(ntp, states)``. With ``labels`` [n, L] (aligned next-token
        targets of rows [:n]; n = ``ntp_rows``, default all rows), ``ntp`` is their per-token
        cross-entropy [n, L] (fp32, 0 where ignored), computed through the vocabulary-parallel
        output layer without logits (mcore/loss.py vocab_parallel_token_losses); without
        ``labels`` it is the LM-head logits [n, L, V_pad/TP] (padded vocabulary columns -inf).
        None when n = 0. ``states`` [B - n, L, H]: the last-layer (final-norm) hidden states of
        rows [n:] for the summary readout (None when n = B). Other stages: the hidden states
        for the next stage, [L (/TP under sequence parallel), B, H]."""
        decoder_input = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=self._rope_from_positions(position_ids))
        if not self.post_process:
            return hidden
        rows = hidden.shape[1]
        n = rows if ntp_rows is None else int(ntp_rows)
        ntp = states = None
        if n > 0:
            head_input = hidden[:, :n] if n < rows else hidden
            weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else self.output_layer.weight
            if labels is not None:
                from .loss import vocab_parallel_token_losses

                ntp = vocab_parallel_token_losses(
                    head_input, weight, labels[:n], true_vocab_size=self.true_vocab_size, sequence_parallel=self.config.sequence_parallel
                )
            else:
                logits, _ = self.output_layer(head_input, weight=weight if self.share_embeddings_and_output_weights else None)  # [L, n, V_pad/TP]
                ntp = self.mask_padded_vocab(logits).transpose(0, 1)
        if n < rows:
            if self.config.sequence_parallel:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            states = hidden[:, n:].transpose(0, 1)
        return ntp, states

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the padding columns (ids >= true vocab) of this rank's vocabulary slice."""
        from megatron.core import parallel_state

        part = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * part
        if start + part <= self.true_vocab_size:
            return logits
        ids = torch.arange(start, start + part, device=logits.device)
        return logits.masked_fill(ids >= self.true_vocab_size, float("-inf"))
