"""Training recipes: model shape, mode, engine layout and batch, one dataclass each. The
throughput recipes were chosen with the memory estimator (``choose``: the cheapest ZeRO
stage, then recomputation only if needed, then the largest micro-batch that fits an 80 GB
H100 with HEADROOM_GB to spare); ``tools/estimate_memory.py --recipes`` prints their
estimates, ``--choose`` reruns the choice. ``paper-*`` recipes reproduce the paper's batch
(32 rows of 512 tokens per optimizer step).

Communication per rank and step (``communication``): payload bytes by collective kind (an
all-gather's gathered tensor, a reduce-scatter's or all-reduce's input), and the bytes a rank
sends with ring algorithms over n ranks ((n-1)/n of an all-gather's or reduce-scatter's
payload, twice that for an all-reduce). P parameters, T trainable, w = 2 (bf16):
  ZeRO-0   the gradients all-reduced once per step: T w
  ZeRO-1/2 the gradients all-reduced (DeepSpeed reduces its gradient buckets with all-reduce,
           use_multi_rank_bucket_allreduce; counted in tests/training/test_communication.py),
           once per step (ZeRO-1) or per micro-batch (ZeRO-2): T w each; then the updated
           parameters all-gathered: T w
  ZeRO-3   per micro-batch the parameters all-gathered in forward and again in backward (once
           a module's parameters are released: models over stage3_max_live_parameters;
           recomputation runs inside the backward's gather): 2 P w, and the gradients
           reduce-scattered: T w
  TP       per micro-batch, of the activations [tokens, h] (w bytes each; L the stage's layers;
           counted on a real TP=2 run in tests/training/test_megatron_memory.py):
           without sequence parallelism 4L + 2 all-reduces (per layer the attention's and the
           MLP's outputs in forward, their inputs' gradients in backward; the embedding's
           output, the LM head's input gradient); with it the same moves as all-gathers and
           reduce-scatters, and backward gathers each column-parallel layer's input again for
           its weight gradient: 6L + 2 all-gathers and 4L + 2 reduce-scatters; full
           recomputation repeats the forward's 2L (of each kind with SP). Plus the vocabulary-
           parallel loss's three fp32 statistics per token (all-reduce) and, with SP, the norm
           weights' fp32 gradients once per step; the distributed optimizer's gradient
           reduce-scatter (fp32) and parameter all-gather (w) of the rank's shard over dp.
  PP       point-to-point, per micro-batch and stage boundary: the stage's output [s, b, h]
           (w bytes; [s/TP, b, h] per TP rank with SP) sent forward, its gradient of the same
           shape sent back (megatron-core's p2p_communication; counted on a real PP=2 run in
           tests/training/test_megatron_memory.py). ``p2p``: what the most loaded rank sends,
           M micro-batches x that tensor once (first / last stage: PP = 2) or twice (a middle
           stage sends forward and back: PP > 2); it receives as much. Phase 1's rows.
Summary mode: the base is frozen and replicated (ZeRO-1/2 shard only what the optimizer holds),
so only the deltas travel. Under megatron-core TP the activations' collectives stay, less one
(the frozen embedding: the first layer's input gradient is not reduced; PP = 1 and no
recomputation, whose re-entered layers ask for that gradient again), plus the
deltas' own: per layer, per micro-batch, four all-reduces of [summary tokens, rank] (the two
row-parallel deltas' intermediates in forward, the two column-parallel ones' gradients in
backward; recomputation repeats the forward's two); counted on a real TP=2 run
(tests/training/test_megatron_memory.py). The recipe tables take every token as a summary token
(an upper bound: the deltas' share is then at most 6 x rank / (4 x hidden) of the TP bytes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from ..gem.tokens import VOCAB_ROW_MULTIPLE  # full mode's vocabulary padding (pad_vocab_rows)

GPU_MEMORY_GB = 80.0
HEADROOM_GB = 10.0  # CUDA context, NCCL buffers, allocator fragmentation

# Published architectures (the HF config.json fields that decide memory).
MODELS = {
    "llama3.2-1b": dict(
        hf="meta-llama/Llama-3.2-1B",
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": dict(
        hf="meta-llama/Llama-3.2-3B",
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hf="meta-llama/Meta-Llama-3-8B",
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        hf="mistralai/Mistral-7B-v0.1",
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
}


def hf_config(model: str):
    """The transformers config of ``model`` (a MODELS key), built offline."""
    from transformers import AutoConfig

    fields = dict(MODELS[model])
    fields.pop("hf")
    return AutoConfig.for_model(fields.pop("model_type"), max_position_embeddings=131072, use_cache=False, **fields)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str  # a MODELS key
    train_mode: str  # "full" | "summary"
    gpus: int
    micro_batch_size: int
    seq_length: int
    global_batch_size: int  # rows per optimizer step
    engine: str = "deepspeed"
    zero_stage: int = 1
    tp: int = 1
    pp: int = 1
    gradient_checkpointing: bool = False
    note: str = ""
    padded_vocab: int = 0  # megatron-core's own padding (a multiple of 128 x TP); 0: vocab_size()'s rule
    sequence_parallel: bool = True  # megatron-core with TP > 1, full mode: --sequence-parallel
    # Phase 2 (train.py's flags; 0: the flag's default): anchors per contrastive micro-batch
    # (--contrastive-batch-size, default 8 x micro_batch_size), their length (--contrastive-max-length),
    # GradCache chunk (--contrastive-micro-batch-size, 0: none), --gem-alpha.
    contrastive_batch_size: int = 0
    contrastive_max_length: int = 512
    contrastive_micro_batch_size: int = 0
    alpha: float = 1.0
    teacher_params: int = 0  # --contrastive-teacher's parameters (fp32 on every GPU; 0: no teacher)
    teacher_dim: int = 0  # its embedding width

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def tokens_per_gpu(self) -> int:
        """Tokens one GPU computes per optimizer step (a tensor-parallel group shares its rows)."""
        return self.micro_batch_size * self.seq_length * self.accumulation

    def vocab_size(self) -> int:
        """The trained vocabulary: full mode adds one GEM token and pads to VOCAB_ROW_MULTIPLE
        rows; summary mode reuses an existing token."""
        v = MODELS[self.model]["vocab_size"]
        if self.padded_vocab:
            return self.padded_vocab
        if self.train_mode == "summary":
            return v
        return -(-(v + 1) // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE

    def contrastive_shape(self):
        """The phase-2 micro-batch per rank (training/contrastive_memory.py ContrastiveShape)."""
        from .contrastive_memory import ContrastiveShape

        return ContrastiveShape(
            batch_size=self.contrastive_batch_size or 8 * self.micro_batch_size,
            max_length=min(self.contrastive_max_length, self.seq_length),
            chunk=self.contrastive_micro_batch_size or None,
            alpha=self.alpha,
            teacher_dim=self.teacher_dim,
            teacher_params=self.teacher_params,
        )

    def layout(self):
        from .memory_estimate import Layout

        bucket = MODELS[self.model]["hidden_size"] ** 2  # ds_config.py's "auto": hidden^2
        # summary mode's deltas act on whole-sequence layer inputs: no sequence parallelism there (mcore/provider.py)
        sp = self.engine == "megatron" and self.tp > 1 and self.sequence_parallel and self.train_mode == "full"
        return Layout(engine=self.engine, zero_stage=self.zero_stage, dp=self.dp, tp=self.tp, pp=self.pp, reduce_bucket_size=bucket, sequence_parallel=sp)

    def check(self) -> None:
        if self.gpus % (self.tp * self.pp) or self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ValueError(f"recipe {self.name}: global batch {self.global_batch_size} is not a multiple of micro-batch x dp")

    def command(self) -> str:
        """The train.py arguments of this recipe (MODEL, DATA, SAVE from the environment)."""
        args = [f"--micro-batch-size {self.micro_batch_size}", f"--global-batch-size {self.global_batch_size}", f"--seq-length {self.seq_length}", "--bf16"]
        if self.engine == "deepspeed":
            args.append(f"--deepspeed {DS_CONFIGS[self.zero_stage]}")
        else:
            args += [f"--tensor-model-parallel-size {self.tp}", f"--pipeline-model-parallel-size {self.pp}"]
            args += ["--sequence-parallel"] if self.layout().sequence_parallel else []
        if self.gradient_checkpointing:
            args.append("--gradient-checkpointing" if self.engine == "deepspeed" else "--recompute-granularity full")
        if self.train_mode == "summary":
            args.append("--gem-train summary")
        if self.contrastive_batch_size:
            args.append(f"--contrastive-batch-size {self.contrastive_batch_size}")
        if self.contrastive_max_length != 512:
            args.append(f"--contrastive-max-length {self.contrastive_max_length}")
        if self.contrastive_micro_batch_size:
            args.append(f"--contrastive-micro-batch-size {self.contrastive_micro_batch_size}")
        if self.alpha != 1.0:
            args.append(f"--gem-alpha {self.alpha:g}")
        return " ".join(args)


DS_CONFIGS = {1: "configs/deepspeed/ds_zero1.json", 2: "configs/deepspeed/ds_zero2.json", 3: "ds_zero3.json"}


@functools.lru_cache(maxsize=None)
def _activations(
    model: str,
    train_mode: str,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    recompute: bool,
    keep_grads: bool,
    layout,
    loss: str = "chunked",
    backend: str = "triton",
):
    """One fake-tensor measurement (tens of seconds at 8B, 8k tokens), shared by the layouts
    that need the same one (the ZeRO stages differ only in whether gradients stay)."""
    import torch

    from .activation_memory import measure_step_activations
    from .memory_estimate import megatron_activations, tp_pp_shard_config

    cfg = hf_config(model)
    tp, pp = layout.tp, layout.pp
    # megatron-core's own model (training/mcore_activation_memory.py) for today's paths; the
    # paths before the GPU-path changes (loss "hf", backend "sdpa") exist in the HF model only.
    if layout.engine == "megatron" and (loss, backend) == ("chunked", "triton"):
        return megatron_activations(
            cfg,
            layout,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=torch.bfloat16,
            recompute=recompute,
            backend="triton",
            train_mode=train_mode,
        )
    if tp * pp > 1:
        cfg = tp_pp_shard_config(cfg, tp=tp, pp=pp)
        vocab_size = -(-vocab_size // tp)
    return measure_step_activations(
        cfg,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        vocab_size=vocab_size,
        train_mode=train_mode,
        gradient_checkpointing=recompute,
        keep_grads=keep_grads,
        loss=loss,
        backend=backend,
    )


def estimate(recipe: Recipe, *, loss: str = "chunked", backend: str = "triton"):
    """The memory estimate of ``recipe`` (training/memory_estimate.py), per rank. ``loss`` and
    ``backend``: the LM-head loss and GEM attention backend measured (activation_memory.py
    measure_step_activations; "hf" and "sdpa": the paths before the GPU-path changes)."""
    from .memory_estimate import estimate_step_memory, keeps_whole_grads

    recipe.check()
    layout = recipe.layout()
    activations = _activations(
        recipe.model,
        recipe.train_mode,
        recipe.micro_batch_size,
        recipe.seq_length,
        recipe.vocab_size(),
        recipe.gradient_checkpointing,
        keeps_whole_grads(layout, recipe.train_mode),
        replace(layout, dp=1, reduce_bucket_size=0, zero_stage=0),  # what the activations depend on (keep_grads: the ZeRO stage's part)
        loss,
        backend,
    )
    return estimate_step_memory(
        hf_config(recipe.model),
        recipe.layout(),
        micro_batch_size=recipe.micro_batch_size,
        seq_length=recipe.seq_length,
        vocab_size=recipe.vocab_size(),
        num_microbatches=recipe.accumulation,
        train_mode=recipe.train_mode,
        gradient_checkpointing=recipe.gradient_checkpointing,
        activations=activations,
    )


@functools.lru_cache(maxsize=None)
def _contrastive_activations(
    model: str,
    train_mode: str,
    shape,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    recompute: bool,
    keep_grads: bool,
    backend: str = "triton",
    layout=None,
):
    """One fake-tensor measurement of a phase-2 micro-batch (minutes at 8B), shared like _activations.
    ``layout``: a megatron-core layout measures that engine's passes on its model (else DeepSpeed's)."""
    from .contrastive_memory import measure_contrastive_step, measure_megatron_contrastive_step

    if layout is not None and layout.engine == "megatron":
        import torch

        return measure_megatron_contrastive_step(
            hf_config(model),
            layout,
            shape,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=torch.bfloat16,
            recompute=recompute,
            backend=backend,
            train_mode=train_mode,
        )
    return measure_contrastive_step(
        hf_config(model),
        shape,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        vocab_size=vocab_size,
        train_mode=train_mode,
        gradient_checkpointing=recompute,
        keep_grads=keep_grads,
        backend=backend,
    )


def estimate_phase2(recipe: Recipe, *, backend: str = "triton"):
    """The memory estimate of ``recipe``'s phase-2 step (training/contrastive_memory.py), per rank:
    the DeepSpeed engine's passes on the HF model, or megatron-core's on its own model (PP > 1:
    a stage with embedding and head times the micro-batches in flight: an upper bound, not validated)."""
    from .contrastive_memory import estimate_contrastive_memory
    from .memory_estimate import keeps_whole_grads

    recipe.check()
    layout, shape = recipe.layout(), recipe.contrastive_shape()
    activations = _contrastive_activations(
        recipe.model,
        recipe.train_mode,
        shape,
        recipe.micro_batch_size,
        recipe.seq_length,
        recipe.vocab_size(),
        recipe.gradient_checkpointing,
        keeps_whole_grads(layout, recipe.train_mode),
        backend,
        replace(layout, dp=1) if layout.engine == "megatron" else None,  # what megatron-core's measurement depends on
    )
    return estimate_contrastive_memory(
        hf_config(recipe.model),
        layout,
        shape,
        micro_batch_size=recipe.micro_batch_size,
        seq_length=recipe.seq_length,
        vocab_size=recipe.vocab_size(),
        train_mode=recipe.train_mode,
        gradient_checkpointing=recipe.gradient_checkpointing,
        activations=activations,
        num_microbatches=recipe.accumulation,
    )


def fits(e) -> bool:
    return e.peak <= (GPU_MEMORY_GB - HEADROOM_GB) * 1e9


def choose(base: Recipe, *, max_micro_batch: int = 8, stages=(1, 2, 3)) -> tuple[Recipe, object]:
    """The cheapest layout for ``base``'s model, mode, GPUs and sequence length: the lowest
    ZeRO stage (least communication) that fits, without recomputation if possible, then the
    largest micro-batch (a power of two up to ``max_micro_batch``) that still fits; the global
    batch is one micro-batch per GPU. (ZeRO-0 is not offered: with bf16 DeepSpeed runs it
    without fp32 master weights.) Raises when nothing fits."""
    for stage in stages:
        for recompute in (False, True):
            best = None
            mb = 1
            while mb <= max_micro_batch:
                r = replace(base, zero_stage=stage, gradient_checkpointing=recompute, micro_batch_size=mb, global_batch_size=mb * base.gpus)
                e = estimate(r)
                if not fits(e):
                    break
                best = (r, e)
                mb *= 2
            if best is not None:
                return best
    raise ValueError(f"{base.name}: no ZeRO stage fits {GPU_MEMORY_GB} GB with {HEADROOM_GB} GB headroom")


def choose_contrastive_chunk(recipe: Recipe) -> int:
    """The GradCache chunk ``recipe``'s phase 2 needs: 0 (none) when the whole contrastive
    micro-batch fits, else the largest power of two below it that fits (GradCache's gradient is
    the unchunked one; a larger chunk runs fewer, larger forwards). Raises when even one pair per
    chunk does not fit."""
    whole = replace(recipe, contrastive_micro_batch_size=0)
    if fits(estimate_phase2(whole)):
        return 0
    chunk = 1
    while chunk * 2 < whole.contrastive_shape().batch_size:
        chunk *= 2
    while chunk >= 1:
        if fits(estimate_phase2(replace(recipe, contrastive_micro_batch_size=chunk))):
            return chunk
        chunk //= 2
    raise ValueError(f"{recipe.name}: phase 2 does not fit {GPU_MEMORY_GB} GB with {HEADROOM_GB} GB headroom even one pair per GradCache chunk")


def from_megatron_json(path) -> Recipe:
    """The Recipe of a configs/megatron/*.json file (model by its HF id; phase 2's contrastive
    flags, --contrastive-batch-size and --contrastive-micro-batch-size, from its command)."""
    import json
    import os
    import shlex

    r = json.loads(open(path).read())
    model = {m["hf"]: k for k, m in MODELS.items()}.get(r["hf_model"])
    if model is None:
        raise ValueError(f"{path}: hf_model {r['hf_model']!r} is not one of {sorted(m['hf'] for m in MODELS.values())}")
    par, b = r["parallel"], r["batch"]
    return Recipe(
        name=os.path.basename(str(path)).removesuffix(".json"),
        model=model,
        train_mode="full",
        gpus=r["gpus"],
        micro_batch_size=b["micro_batch_size"],
        seq_length=b["seq_length"],
        global_batch_size=b["global_batch_size"],
        engine="megatron",
        zero_stage=0,
        tp=par["tensor_model_parallel_size"],
        pp=par["pipeline_model_parallel_size"],
        gradient_checkpointing=r["recompute_granularity"] == "full",
        padded_vocab=r["model_shape"]["padded_vocab_size"],
        sequence_parallel=bool(par.get("sequence_parallel", False)),
        contrastive_batch_size=_flag_value(shlex.split(r["command"]), "--contrastive-batch-size", 0),
        contrastive_micro_batch_size=_flag_value(shlex.split(r["command"]), "--contrastive-micro-batch-size", 0),
    )


def _flag_value(argv: list[str], name: str, default: int) -> int:
    """The integer value of ``name`` in a command line (``--name N`` or ``--name=N``), else ``default``."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith(name + "="):
            return int(a.split("=", 1)[1])
    return default


def communication(recipe: Recipe) -> dict:
    """Bytes sent per rank per optimizer step, by collective kind (see the module docstring)."""
    from .memory_estimate import model_counts

    c = model_counts(hf_config(recipe.model), vocab_size=recipe.vocab_size(), train_mode=recipe.train_mode)
    return communication_bytes(
        total=c.total,
        trainable=c.trainable,
        layout=recipe.layout(),
        micro_batches=recipe.accumulation,
        tokens=recipe.micro_batch_size * recipe.seq_length,
        hidden=MODELS[recipe.model]["hidden_size"],
        layers=c.num_layers,
        recompute=recipe.gradient_checkpointing,
        # an upper bound: every token a summary token (the deltas' share is then <= 6 x rank / (4 x hidden) of the TP traffic)
        summary_tokens=recipe.micro_batch_size * recipe.seq_length if recipe.train_mode == "summary" else None,
    )


def communication_bytes(
    *,
    total: int,
    trainable: int,
    layout,
    micro_batches: int,
    tokens: int = 0,
    hidden: int = 0,
    layers: int = 0,
    weight_bytes: int = 2,
    recompute: bool = False,
    summary_tokens: int | None = None,
    adapter_rank: int = 16,
) -> dict:
    """Payload bytes per rank per optimizer step, by kind, and ``sent``: the bytes a rank
    sends with ring algorithms ((n-1)/n of an all-gather's or reduce-scatter's payload, twice
    that of an all-reduce's). ``summary_tokens`` (per micro-batch) marks summary mode under
    megatron-core TP: see the module docstring."""
    w, n = weight_bytes, layout.dp
    out = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0, "p2p": 0}
    ring = (n - 1) / n if n > 1 else 0.0
    sent = 0.0
    if layout.engine == "megatron":
        t = layout.tp
        shard = trainable / (t * layout.pp)
        if n > 1:  # the distributed optimizer over the data-parallel group
            out["reduce_scatter"] += 4 * shard  # fp32 main grads
            out["all_gather"] += w * shard
            sent += ring * 6 * shard
        if t > 1:
            L = layers // layout.pp
            ends = 2 if layout.pp == 1 else 1  # the embedding's output (first stage), the LM head's input (last stage)
            again = 2 * L if recompute else 0  # the forward's collectives, run again in backward
            unit = micro_batches * tokens * hidden * w  # one [tokens, hidden] activation per micro-batch
            loss_stats = 3 * micro_batches * tokens * 4  # the vocabulary-parallel loss: max, sum of exp, target logit (fp32)
            if layout.sequence_parallel:
                ag, rs = (6 * L + ends + again) * unit, (4 * L + ends + again) * unit
                ar = loss_stats + (2 * L + 1) * hidden * 4  # the norms' fp32 gradients, summed over TP once per step
            else:
                ag = rs = 0
                ar = (4 * L + ends + again) * unit + loss_stats
            if summary_tokens is not None:
                if layout.pp == 1 and not recompute:
                    # the frozen embedding: the first layer's input gradient is never reduced
                    # (full recomputation re-enters the layers with an input that asks for one: counted)
                    ar -= unit
                # the deltas' [summary tokens, rank] intermediates: per layer the two row-parallel
                # ones (attention output, MLP down) reduced in forward (again under recompute),
                # the two column-parallel ones (QKV, MLP up) in backward
                ar += L * (4 + (2 if recompute else 0)) * micro_batches * summary_tokens * adapter_rank * w
            out["all_reduce"] += ar
            out["all_gather"] += ag
            out["reduce_scatter"] += rs
            sent += (t - 1) / t * (2 * ar + ag + rs)
        if layout.pp > 1:
            boundary = tokens * hidden * w / (t if layout.sequence_parallel else 1)  # one stage output (or its gradient), per TP rank
            out["p2p"] = (2 if layout.pp > 2 else 1) * micro_batches * boundary
            sent += out["p2p"]
    elif layout.zero_stage == 0:
        out["all_reduce"] = trainable * w
        sent = 2 * ring * trainable * w
    elif layout.zero_stage in (1, 2):
        out["all_reduce"] = trainable * w * (micro_batches if layout.zero_stage == 2 else 1)
        out["all_gather"] = trainable * w
        sent = ring * (2 * out["all_reduce"] + out["all_gather"])
    else:
        out["all_gather"] = 2 * total * w * micro_batches
        out["reduce_scatter"] = trainable * w * micro_batches
        sent = ring * (out["all_gather"] + out["reduce_scatter"])
    out["sent"] = sent
    return out


def layout_variants(recipe: Recipe, tp: int = 8) -> list[tuple[str, Recipe]]:
    """``recipe`` under ZeRO-1, -2, -3 and under megatron-core TP=``tp`` over the same GPUs and
    global batch (one row per micro-batch there): the layouts whose communication the docs
    compare."""
    dp = recipe.gpus // tp
    return [
        ("ZeRO-1", replace(recipe, zero_stage=1)),
        ("ZeRO-2", replace(recipe, zero_stage=2)),
        ("ZeRO-3", replace(recipe, zero_stage=3)),
        (f"TP={tp} (megatron-core, dp={dp})", replace(recipe, engine="megatron", zero_stage=0, tp=tp, micro_batch_size=1)),
    ]


def _throughput(model: str, mode: str, *, micro_batch_size: int, gradient_checkpointing: bool = False, zero_stage: int = 1) -> Recipe:
    return Recipe(
        name=f"{model}-{mode}-8k",
        model=model,
        train_mode=mode,
        gpus=8,
        micro_batch_size=micro_batch_size,
        seq_length=8192,
        global_batch_size=8 * micro_batch_size,
        zero_stage=zero_stage,
        gradient_checkpointing=gradient_checkpointing,
        note="throughput: packed rows of 8192 tokens, one micro-batch per GPU per step",
    )


def _paper(model: str, gpus: int, *, contrastive_micro_batch_size: int = 0) -> Recipe:
    return Recipe(
        name=f"paper-{model}",
        model=model,
        train_mode="full",
        gpus=gpus,
        micro_batch_size=32 // gpus,
        seq_length=512,
        global_batch_size=32,
        zero_stage=1,
        contrastive_micro_batch_size=contrastive_micro_batch_size,
        note=f"the paper's batch: 32 rows x 512 = 16,384 tokens per step; each of {gpus} GPUs computes {32 // gpus} rows",
    )


# The table. Throughput recipes: the layout `choose` picked (tools/estimate_memory.py --choose
# reruns it): ZeRO-1 fits every model on 8 H100s; recomputation only where the larger models'
# activations need it, which then buys the largest micro-batch. Phase 2 with train.py's default
# contrastive batch (8 x micro-batch pairs of 512 tokens): at 8k rows that is phase 1's token
# count, but the paper recipes' rows are 512 tokens, so phase 2 runs 16x phase 1's tokens per
# micro-batch; 3B and 8B then need GradCache (`choose_contrastive_chunk`, docs/slurm.md: 135 and
# 130 GB per GPU unchunked, 50 and 66 GB in chunks of 8 and 4 pairs).
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _paper("llama3.2-1b", 8),
        _paper("llama3.2-3b", 8, contrastive_micro_batch_size=8),
        _paper("llama3-8b", 16, contrastive_micro_batch_size=4),
        _throughput("llama3.2-1b", "full", micro_batch_size=4),
        _throughput("llama3.2-1b", "summary", micro_batch_size=4),
        _throughput("llama3.2-3b", "full", micro_batch_size=1),
        _throughput("llama3.2-3b", "summary", micro_batch_size=2),
        _throughput("llama3-8b", "full", micro_batch_size=8, gradient_checkpointing=True),
        _throughput("llama3-8b", "summary", micro_batch_size=1),
        _throughput("mistral-7b", "full", micro_batch_size=8, gradient_checkpointing=True),
        _throughput("mistral-7b", "summary", micro_batch_size=1),
    )
}
