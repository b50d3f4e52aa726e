"""GEMGPTModel: megatron-core's GPTModel with what GEM needs, and ``build_gem_gpt_model``, a rank's
GEMGPTModel from llama.py's architecture and layer spec (its own module so that importing
megatron_gem.mcore.llama does not import megatron-core; it imports llama.py, never the reverse)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from ..gem.losses import LogitScale
from .llama import LlamaArch, gem_block_spec, inv_freq


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


def build_gem_gpt_model(
    arch: LlamaArch,
    config,
    *,
    vocab_size: int,
    padded_vocab: int,
    backend: str = "auto",
    suffix_sees_bos: bool = False,
    logit_scale_init: float = 20.0,
    logit_scale_max: float = 100.0,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    layer_impl: str = "local",
):
    """The GEM GPTModel of this pipeline stage (megatron-core parallel state must be initialised).

    ``vocab_size`` is the real vocabulary (tokenizer incl. GEM tokens, or the checkpoint's
    embedding rows), ``padded_vocab`` what megatron allocates (see padded_vocab_size);
    ``layer_impl`` as mcore.fused chose it (``config`` built with the same)."""
    from megatron.core import parallel_state

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = GEMGPTModel(
        config=config,
        transformer_layer_spec=gem_block_spec(
            config, backend=backend, suffix_sees_bos=suffix_sees_bos, layer_impl=layer_impl, sliding_window=arch.sliding_window
        ),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        arch=arch,
        true_vocab_size=vocab_size,
        logit_scale_init=logit_scale_init,
        logit_scale_max=logit_scale_max,
    )
    mark_tensor_parallel_weights(model)
    return model


def mark_tensor_parallel_weights(model) -> None:
    """Tag every TP-split weight with megatron-core's tensor-parallel attributes.

    megatron-core 0.16 sets them only inside its weight initialisers, which
    ``perform_initialization=False`` (weights come from a checkpoint) skips; without them the
    optimizer takes split weights for TP duplicates and the gradient norm (hence clipping)
    counts only TP rank 0's slices."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes

    for module in model.modules():
        dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}.get(type(module))
        if dim is None:
            for cls, d in ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1)):
                if isinstance(module, cls):
                    dim = d
        weight = getattr(module, "weight", None)
        if dim is not None and isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)
