"""Per-GPU memory of a megatron-core GEM run (the arithmetic each configs/megatron recipe
documents and tests/megatron re-checks).

Assumptions, stated so they can be argued with:
  weights      bf16, 2 bytes per parameter held by the GPU (its TP slice of its PP stage)
  grads        fp32 main-grad buffer (grad_reduce_in_fp32), 4 bytes per parameter
  optimizer    distributed optimizer: fp32 master copy + Adam exp_avg + exp_avg_sq = 12 bytes
               per parameter, sharded over the data-parallel ranks
  activations  bf16, flash-style attention (no L x L scores kept). Stored per layer and token
               without recomputation: layer-norm inputs and outputs (4h), Q/K/V after RoPE
               (h + 2 h_kv), attention output (h), SwiGLU gate/up outputs (2F) and product (F):
               2 * (6h + 2 h_kv + 3F) bytes, divided by TP (sequence parallel shards the norm
               regions, TP the rest). Full recomputation keeps only each layer's input
               (2h / TP bytes per token) plus one layer's full set during its backward.
               The first pipeline stage holds min(PP, micro-batches) micro-batches in flight
               (1F1B). The last stage adds the fp32 logits and their gradient: 8 V / TP bytes
               per token.
GEM's own tensors (doc ids, roles, the logit scale) are negligible. Not counted: the CUDA
context and allocator fragmentation (budget ~5-8 GB), which is why recipes keep a margin below
80 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # padded
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_key_value_heads * self.head_dim
        return h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h  # qkv, proj, fc1 (2F) + fc2, two norms

    def total_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params() + emb * (1 if self.tied else 2) + self.hidden_size


def per_gpu_memory(
    shape: ModelShape, *, tp: int, pp: int, dp: int, micro_batch_size: int, seq_length: int, num_microbatches: int, recompute: str | None
) -> dict:
    """Bytes per GPU on the most loaded pipeline stage (first stage for activations; the
    embedding/LM head are placed on the first/last stage). Returns GiB values."""
    layers = shape.num_layers // pp
    emb = shape.vocab_size * shape.hidden_size
    # The heaviest stage: its layers plus the embedding (first) or LM head (last; with tied
    # embeddings and PP > 1 the last stage keeps its own copy).
    stage_params = layers * shape.layer_params() + emb + shape.hidden_size
    if pp == 1 and not shape.tied:
        stage_params += emb
    params = stage_params / tp
    weights = 2 * params
    grads = 4 * params
    optimizer = 12 * params / dp
    tokens = micro_batch_size * seq_length
    h, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.num_key_value_heads * shape.head_dim
    full_layer = 2 * (6 * h + 2 * kv + 3 * f) * tokens / tp
    if recompute == "full":
        per_microbatch = layers * 2 * h * tokens / tp
        working = full_layer
    else:
        per_microbatch = layers * full_layer
        working = 0
    in_flight = min(pp, num_microbatches)
    logits = 8 * shape.vocab_size * tokens / tp
    activations = per_microbatch * in_flight + working + (logits if pp == 1 else 0)
    if pp > 1:  # the last stage: its own in-flight activations are fewer, but it holds logits
        last = per_microbatch * 1 + working + logits + (0 if shape.tied else 0)
        activations = max(activations, last)
    out = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations}
    out = {k: round(v / GIB, 2) for k, v in out.items()}
    out["total"] = round(sum(out.values()), 2)
    out["params_per_gpu_billion"] = round(params / 1e9, 3)
    return out
