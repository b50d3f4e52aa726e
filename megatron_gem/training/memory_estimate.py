"""Peak memory per rank of one training step, by part: parameters, gradients and optimizer state
by the sharding rule of the engine and layout, activations / logits and loss / attention
workspace measured on fake tensors at the real shapes (training/activation_memory.py).

Sharding rules (P parameters, T of them trainable: P in full mode, the adapter's deltas and
the logit scale in summary mode; w the weight bytes, 2 for bf16, 4 for fp32):

DeepSpeed (what its engine builds for our configs; ``grad_accum_dtype`` unset)
  stage 0   the plain optimizer on the model's weights (bf16: DeepSpeed's DDP_BFLOAT16, no
            fp32 master): params P*w, grads T*w, Adam m, v 2*T*w
  stage 1   params P*w; grads T*w (whole until the boundary); fp32 master + m + v 12*T/dp
  stage 2   params P*w; grads T*w/dp plus the reduce bucket (min(bucket, T)*w), from the
            first gradient's reduction on; 12*T/dp
  stage 3   params P*w/dp plus the gathered working set (one decoder layer and the largest
            of embedding / LM head, gathered whole around their forward and backward);
            grads T*w/dp plus the bucket (resident from initialisation); 12*T/dp
megatron-core (as training/megatron_engine.py builds it: DDP with fp32 grad buffers, the
distributed optimizer)
  params w*P_rank, grads 4*P_rank (the fp32 main-grad buffer, resident), optimizer
  12*P_rank/dp with bf16 weights (fp32 master + Adam m, v) or 8*P_rank/dp with fp32 weights
  (the master is the weight itself), where P_rank is the most loaded pipeline stage's
  parameters (its layers plus the embedding, and the LM head when PP = 1) over TP. Summary
  mode: params w*(P_rank + T_rank), grads 4*T_rank, optimizer (12 or 8)*T_rank/dp, where
  T_rank is the adapter this rank holds as mcore/summary.py splits it
  (megatron_trainable_shards: per fused layer, A [r, in] and B [out/TP, r] for linear_qkv and
  linear_fc1, A [r, in/TP] and B [out, r] for linear_proj and linear_fc2; one A per fused
  layer, where HF's adapter has one per projection) plus the logit scale.
  Activations are measured on megatron-core's own GEM model of one TP rank
  (mcore_activation_memory.py: a fake process group of TP ranks, so heads, FFN width and
  vocabulary are sharded, and with sequence parallelism the hidden-size tensors too, as the
  real layers do); at PP = 1 the layers with embedding and head. Under PP the first stage
  (its layers and the embedding) and the last (its layers on the received input, the LM head
  and the loss) are measured apart (PipelineStages), each as one micro-batch's peak and what
  its forward leaves for backward; 1F1B runs min(PP - r, micro-batches) forwards on stage r
  before its first backward, so the first stage adds min(PP, micro-batches) - 1 micro-batches'
  saved tensors to its peak (a middle stage has fewer states and fewer in flight). Validated at
  PP = 2 (tests/training/test_megatron_memory.py). Summary mode's activations are
  measured the same way, on that model with the frozen base and mcore/summary.py's adapter
  attached (its deltas at each document's summary token). Validated against real
  megatron-core runs on CPU, full and summary mode (tests/training/test_megatron_memory.py).
  Phase 2 (training/contrastive_memory.py estimate_contrastive_memory): the engine's own
  phase-2 passes on that model (mcore_activation_memory.py ``phase2``), validated the same way
  at PP = 1; under PP the contrastive rows are fixed as the engine fixes them and one
  stage's layers with embedding and head count once per micro-batch in flight (an upper bound, not
  validated).

Not counted: the CUDA context, NCCL buffers and allocator fragmentation (budget ~5-8 GB on an
80 GB GPU: the recipes keep that headroom).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .activation_memory import ActivationPeak, Composition, fake_model, measure_optimizer_step, measure_step_activations

GB = 1e9
PARTS = ("parameters", "gradients", "optimizer", "activations", "logits_loss", "attention")


@dataclass(frozen=True)
class Layout:
    """How a step runs: ``engine`` "deepspeed" (``zero_stage``) or "megatron" (tp, pp); dp is
    the data-parallel size either way."""

    engine: str = "deepspeed"
    zero_stage: int = 0
    dp: int = 1
    tp: int = 1
    pp: int = 1
    reduce_bucket_size: int = 500_000_000  # elements; DeepSpeed's default (ours: hidden^2)
    sequence_parallel: bool = False  # megatron-core with TP > 1: hidden-size activations split over TP

    def __post_init__(self):
        if self.engine not in ("deepspeed", "megatron"):
            raise ValueError(f"engine must be 'deepspeed' or 'megatron', got {self.engine!r}")
        if self.engine == "deepspeed" and (self.tp, self.pp) != (1, 1):
            raise ValueError("the DeepSpeed engine has no tensor / pipeline parallelism (tp = pp = 1)")
        if self.sequence_parallel and (self.engine != "megatron" or self.tp == 1):
            raise ValueError("sequence_parallel needs the megatron engine with tp > 1")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")

    def describe(self) -> str:
        if self.engine == "deepspeed":
            return f"ZeRO-{self.zero_stage} dp={self.dp}"
        return f"TP={self.tp} PP={self.pp} dp={self.dp}{' SP' if self.sequence_parallel else ''}"


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of the trained model (vocabulary with GEM tokens and padding)."""

    total: int
    trainable: int
    layer: int  # one decoder layer
    embedding: int  # input embedding (the LM head has the same shape)
    num_layers: int
    tied: bool
    # summary mode: one layer's deltas as megatron-core fuses them (mcore/summary.py TARGETS):
    # (parallel kind, in_features, out_features) of linear_qkv, linear_proj, linear_fc1, linear_fc2
    fused_adapter: tuple = ()
    adapter_rank: int = 0


def megatron_trainable_shards(c: ModelCounts, layout: Layout) -> list[int]:
    """Summary mode on megatron-core: the sizes of the trainable tensors one rank of the most
    loaded stage holds (mcore/summary.py: a column-parallel layer's delta has A [r, in]
    replicated and B [out/TP, r] split; a row-parallel one A [r, in/TP] split and B [out, r]
    replicated), and the logit scale."""
    r, tp = c.adapter_rank, layout.tp
    per_layer = []
    for kind, i, o in c.fused_adapter:
        per_layer += [r * i, o // tp * r] if kind == "column" else [r * (i // tp), o * r]
    return per_layer * (c.num_layers // layout.pp) + [1]


def model_counts(hf_config, *, vocab_size: int, train_mode: str = "full", adapter_rank: int = 16) -> ModelCounts:
    """Counted on the meta-device model itself (no memory): what the engine will hold."""
    from ..hf.summary import DEFAULT_HF_TARGETS, adapter_shapes, decoder_layers

    lm = fake_model(hf_config, dtype=torch.bfloat16, vocab_size=vocab_size)
    total = sum(p.numel() for p in lm.parameters()) + 1  # + the InfoNCE logit scale
    if train_mode == "summary":  # low-rank deltas A [r, in] and B [out, r] on every projection
        trainable = sum(adapter_rank * (i + o) for i, o in adapter_shapes(lm, DEFAULT_HF_TARGETS).values()) + 1
    else:
        trainable = total
    layer = sum(p.numel() for p in decoder_layers(lm)[0].parameters())
    fused = ()
    if train_mode == "summary":  # one layer's projections, fused as megatron-core's layers are
        one = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for n, m in decoder_layers(lm)[0].named_modules() if isinstance(m, torch.nn.Linear)}
        fused = (
            ("column", one["q_proj"][0], one["q_proj"][1] + one["k_proj"][1] + one["v_proj"][1]),
            ("row", *one["o_proj"]),
            ("column", one["gate_proj"][0], one["gate_proj"][1] + one["up_proj"][1]),
            ("row", *one["down_proj"]),
        )
    return ModelCounts(
        total=total,
        trainable=trainable,
        layer=layer,
        embedding=lm.get_input_embeddings().weight.numel(),
        num_layers=len(decoder_layers(lm)),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        fused_adapter=fused,
        adapter_rank=adapter_rank if train_mode == "summary" else 0,
    )


def state_bytes(c: ModelCounts, layout: Layout, *, weight_bytes: int, train_mode: str = "full") -> dict:
    """{parameters, gradients, optimizer} bytes per rank by the sharding rules above."""
    P, T, w, dp = c.total, c.trainable, weight_bytes, layout.dp
    if layout.engine == "megatron":
        stage = c.num_layers // layout.pp * c.layer + c.embedding
        if layout.pp == 1 and not c.tied:
            stage += c.embedding
        p_rank = stage / layout.tp
        # summary mode: the base (frozen, no grad buffer) and the adapter's shards on the rank
        t_rank = p_rank if train_mode == "full" else sum(megatron_trainable_shards(c, layout))
        # the distributed optimizer's fp32 master is a copy of bf16 weights, the weight itself in fp32
        master = 4 if w != 4 else 0
        held = p_rank if train_mode == "full" else p_rank + t_rank
        return {"parameters": w * held, "gradients": 4 * t_rank, "optimizer": (master + 8) * t_rank / dp}
    s = layout.zero_stage
    bucket = min(layout.reduce_bucket_size, T) * w
    if s == 0:
        return {"parameters": P * w, "gradients": T * w, "optimizer": 2 * T * w}
    optimizer = 12 * T / dp
    if s == 1:
        return {"parameters": P * w, "gradients": T * w, "optimizer": optimizer}
    grads = T * w / dp + bucket
    if s == 2:
        return {"parameters": P * w, "gradients": grads, "optimizer": optimizer}
    gathered = (c.layer + c.embedding) * w  # ZeRO-3's working set: a layer and the head, whole
    return {"parameters": P * w / dp + gathered, "gradients": grads, "optimizer": optimizer}


@dataclass(frozen=True)
class PipelineStages:
    """megatron-core under PP > 1: the first and the last stage measured apart (their own
    layers; the embedding, or the received input with the LM head and loss), each as the peak
    of one micro-batch and what stays live once its forward ends (``*_saved``: kept for its
    backward). A middle stage has fewer states and fewer micro-batches in flight than the first."""

    first: ActivationPeak
    first_saved: Composition
    last: ActivationPeak
    last_saved: Composition


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits_loss: float
    attention: float

    @property
    def peak(self) -> float:
        return sum(asdict(self).values())

    def gb(self) -> dict:
        out = {k: round(v / GB, 3) for k, v in asdict(self).items()}
        out["peak"] = round(self.peak / GB, 3)
        return out


def estimate_step_memory(
    hf_config,
    layout: Layout,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    num_microbatches: int = 1,
    bf16: bool = True,
    train_mode: str = "full",
    gradient_checkpointing: bool = False,
    adapter_rank: int = 16,
    activations: ActivationPeak | None = None,
    backend: str = "triton",
    optimizer: str = "fused_adam",
) -> MemoryEstimate:
    """Peak bytes per rank of one step (the most loaded rank). ``activations``: a measurement
    to reuse (else measured here: a few seconds on CPU). ``backend``: the GEM attention backend
    of the run (triton: a CUDA run's packed rows; sdpa: a CPU run's dense-mask path).
    ``optimizer``: "fused_adam" (GPU: DeepSpeed's FusedAdam, in place) or "torch_adamw" (the
    CPU engine's; its step temporaries are measured on fake tensors).

    The peak is the larger of two moments: forward/backward (resident states + what the
    measured step holds) and the optimizer step (resident states + the gradients as the step
    sees them + its flat copies and temporaries, activations gone)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = 2 if bf16 else 4
    counts = model_counts(hf_config, vocab_size=vocab_size, train_mode=train_mode, adapter_rank=adapter_rank)
    states = state_bytes(counts, layout, weight_bytes=w, train_mode=train_mode)
    # Whole gradients that appear during backward (ZeRO-0/1: param.grad until the step) are
    # measured on the step's own timeline; ZeRO-2's partition is counted from the first
    # reduction on (allocated there, freed after the step); ZeRO-3's partition (allocated at
    # initialisation) and megatron-core's main-grad buffer are resident all along.
    timeline_grads = keeps_whole_grads(layout, train_mode)
    if activations is None and layout.engine == "megatron":
        activations = megatron_activations(
            hf_config,
            layout,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=dtype,
            recompute=gradient_checkpointing,
            backend=backend,
            train_mode=train_mode,
            adapter_rank=adapter_rank,
        )
    if activations is None:
        activations = measure_step_activations(
            hf_config,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=dtype,
            train_mode=train_mode,
            gradient_checkpointing=gradient_checkpointing,
            keep_grads=timeline_grads,
            backend=backend,
        )
    resident = {"parameters": states["parameters"], "optimizer": states["optimizer"]}
    step_grads = step_phase_gradients(counts, layout, weight_bytes=w, optimizer=optimizer)
    step = MemoryEstimate(**resident, gradients=step_grads, activations=0, logits_loss=0, attention=0)
    if isinstance(activations, PipelineStages):
        # 1F1B: stage r runs min(PP - r, micro-batches) forwards before its first backward, so the
        # first stage holds that many micro-batches' saved tensors at its peak (one of them at its
        # backward's peak), the last stage one
        stages = [(activations.first, activations.first_saved, min(layout.pp, num_microbatches)), (activations.last, activations.last_saved, 1)]
        candidates = [
            MemoryEstimate(
                **resident,
                gradients=states["gradients"],
                activations=peak.overall.activations + (k - 1) * saved.activations,
                logits_loss=peak.overall.logits_loss + (k - 1) * saved.logits_loss,
                attention=peak.overall.attention + (k - 1) * saved.attention,
            )
            for peak, saved, k in stages
        ]
        return max(*candidates, step, key=lambda e: e.peak)
    # (a measurement given for a pipeline stage: the upper bound of every micro-batch in flight at its peak)
    in_flight = min(layout.pp, num_microbatches) if layout.engine == "megatron" else 1
    a = activations.overall
    if timeline_grads:
        grads, at = a.gradients, a
    elif layout.engine == "deepspeed" and layout.zero_stage == 2:
        b = activations.backward
        before = a.total - a.gradients
        after = b.total - b.gradients + states["gradients"]
        grads, at = (states["gradients"], b) if after >= before else (0.0, a)
    else:
        grads, at = states["gradients"], a
    backward_pass = MemoryEstimate(
        **resident,
        gradients=grads,
        activations=at.activations * in_flight,
        logits_loss=at.logits_loss,
        attention=at.attention,
    )
    return max(backward_pass, step, key=lambda e: e.peak)


def keeps_whole_grads(layout: Layout, train_mode: str) -> bool:
    """Whether the parameters' own gradients stay whole through backward (ZeRO-0/1): they are
    then measured on the step's timeline rather than counted by the sharding rule."""
    return layout.engine == "deepspeed" and layout.zero_stage <= 1 and train_mode == "full"


def step_phase_gradients(c: ModelCounts, layout: Layout, *, weight_bytes: int, optimizer: str) -> float:
    """Bytes of gradients and their copies live at the peak of the optimizer step (DeepSpeed's
    step: the partition's gradients flattened, cast to fp32 for the master weights, Adam; the
    gradients themselves are freed only after it), plus the optimizer's temporaries."""
    if optimizer not in ("fused_adam", "torch_adamw"):
        raise ValueError(f"optimizer must be 'fused_adam' or 'torch_adamw', got {optimizer!r}")
    T, w = c.trainable, weight_bytes
    if layout.engine == "megatron":  # fp32 main grads are the buffer counted as resident
        shards = megatron_trainable_shards(c, layout) if c.fused_adapter else [math.ceil(c.embedding / layout.tp)]
        # torch AdamW (CPU) steps one parameter shard at a time: its temporaries are the largest one's
        temps = measure_optimizer_step([max(shards)]) if optimizer == "torch_adamw" else 0
        t_rank = sum(shards) if c.fused_adapter else T / (layout.tp * layout.pp)
        return 4 * t_rank + temps
    dp, s = layout.dp, layout.zero_stage
    part = math.ceil(T / dp)
    temps = measure_optimizer_step([part] if s else [T], dtype=torch.float32 if s or w == 4 else torch.bfloat16) if optimizer == "torch_adamw" else 0
    if s == 0:
        return T * w + temps
    cast = 4 * part if w != 4 else 0  # bf16 -> the fp32 master's grad; fp32 grads are used as they are
    if s == 3:  # the partition (resident) is flattened into the fp32 master's grad
        return part * w + 4 * part + temps
    grads = T * w if s == 1 else part * w  # still held while Adam runs (measured on CPU)
    return grads + part * w + cast + temps


def megatron_activations(
    hf_config,
    layout: Layout,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    dtype,
    recompute: bool,
    backend: str,
    train_mode: str = "full",
    adapter_rank: int = 16,
    phase2: dict | None = None,
    contrastive_rows: int | None = None,
):
    """The activation peak of one micro-batch on the most loaded megatron-core rank (its
    stage's layers, its TP shard; training/mcore_activation_memory.py, a child process of a few
    seconds); ``phase2``/``contrastive_rows``: a phase-2 micro-batch (measure()'s arguments)."""
    from ..mcore.llama import padded_vocab_size
    from .mcore_activation_memory import measure_megatron_activations

    if hf_config.num_hidden_layers % layout.pp:
        raise ValueError(f"num_hidden_layers={hf_config.num_hidden_layers} is not divisible by PP={layout.pp}")
    kwargs = dict(
        tp=layout.tp,
        num_layers=hf_config.num_hidden_layers // layout.pp,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        vocab_size=padded_vocab_size(vocab_size, layout.tp),  # a multiple of 128 x TP already stays
        dtype=str(dtype).replace("torch.", ""),
        sequence_parallel=layout.sequence_parallel,
        recompute=recompute,
        backend=backend,
        train_mode=train_mode,
        adapter_rank=adapter_rank,
        phase2=phase2,
        contrastive_rows=contrastive_rows,
    )
    if layout.pp == 1 or phase2 is not None:
        return measure_megatron_activations(hf_config, **kwargs)
    first, first_saved = measure_megatron_activations(hf_config, with_saved=True, post_process=False, **kwargs)
    last, last_saved = measure_megatron_activations(hf_config, with_saved=True, pre_process=False, **kwargs)
    return PipelineStages(first, first_saved, last, last_saved)


def tp_pp_shard_config(hf_config, *, tp: int, pp: int):
    """The HF config of one tensor-parallel rank of one pipeline stage: heads, key/value heads
    and FFN width over TP, layers over PP (what that rank's activations are made of)."""
    import copy

    cfg = copy.deepcopy(hf_config)
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by TP={tp}")
    if cfg.num_hidden_layers % pp:
        raise ValueError(f"num_hidden_layers={cfg.num_hidden_layers} is not divisible by PP={pp}")
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.num_attention_heads //= tp
    cfg.num_key_value_heads //= tp
    cfg.intermediate_size //= tp
    cfg.num_hidden_layers //= pp
    return cfg


def format_table(rows: list[tuple[str, MemoryEstimate]]) -> str:
    """A markdown table: one row per (name, estimate), GB (10^9 bytes) per rank by part."""
    head = "| recipe | " + " | ".join(PARTS) + " | peak GB |"
    lines = [head, "|" + " --- |" * (len(PARTS) + 2)]
    for name, e in rows:
        g = e.gb()
        lines.append(f"| {name} | " + " | ".join(f"{g[p]:.2f}" for p in PARTS) + f" | {g['peak']:.2f} |")
    return "\n".join(lines)
