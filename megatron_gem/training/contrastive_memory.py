"""The activation memory of one phase-2 (contrastive) micro-batch, measured the way phase 1's is
(training/activation_memory.py): the real model on fake tensors, every storage counted while it
lives. What runs is the DeepSpeed engine's own step (training/step_plan.py ``run_step`` with
training/deepspeed_engine.py's ``DeepSpeedPasses``), on a real contrastive micro-batch made by
the real data set (data/datasets.py ``ContrastiveDataset``: N anchors and their N positives, each
text at ``--contrastive-max-length`` with its special tokens, packed into rows of
``--seq-length``), so every part of a phase-2 step is in the measurement: the texts' forward and
backward (or, with GradCache, each chunk's no-grad pass, the loss and its embedding gradients
over the whole micro-batch, then each chunk again with a graph), the in-batch similarity matrix
and its softmax, the teacher's rows and KL term when distilling, and the (1 - alpha)-weighted
NTP rows of the micro-batch, which ride with its first chunk.

Two things differ from phase 1's measurement, because a phase-2 step reads its data:

* the batch's metadata (token ids, doc ids, roles, positions) are real tensors, and every
  operator whose tensor inputs are all real runs for real (its outputs count like any other:
  the device holds them too). Reading out the summary tokens (a boolean mask over the rows) and
  the packing's checks then work as they do in training (an integer or boolean tensor an
  operator makes from nothing, a position range or a mask, is real too, so metadata derived from
  it stays real); a boolean index into a fake tensor is turned into the integer index it stands
  for, so the result has its real shape;
* a Python number read from a fake tensor (``float(loss)`` for the metrics record) has no value
  to give: it reads 0 (it only feeds the record).

Parameters are fake, so the forward and backward allocate exactly what they would on the
device, without computing anything of size.

A megatron-core layout's phase 2 is measured the same way on that engine's own step
(training/mcore_activation_memory.py with ``phase2``: MegatronPasses through run_step on
megatron-core's GEM model of one TP rank, the same batches from this module);
``estimate_contrastive_memory`` picks it by the layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .activation_memory import ActivationPeak, Composition, fake_model
from .step_inputs import ContrastiveShape, RealMetadataTracker, contrastive_batch, gem_config_for, ntp_batch  # noqa: F401  (ContrastiveShape: this module's API too)


class _Engine:
    """The calls DeepSpeedPasses makes on DeepSpeed's engine, without DeepSpeed: the forward is
    the model's, backward is autograd's (the 1/accumulation scaling DeepSpeed applies is one
    scalar multiply), and the optimizer step is counted apart (memory_estimate.py)."""

    def __init__(self, model):
        self.module = model

    def __call__(self, batch, task):
        return self.module(batch, task)

    def backward(self, loss):
        loss.backward()

    def set_gradient_accumulation_boundary(self, flag):
        pass

    def step(self):
        pass


def measure_contrastive_step(
    hf_config,
    shape: ContrastiveShape,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    dtype: torch.dtype = torch.bfloat16,
    train_mode: str = "full",
    gradient_checkpointing: bool = False,
    keep_grads: bool = False,
    backend: str = "triton",
    fast_summary: bool = True,
) -> ActivationPeak:
    """Peak bytes of one phase-2 micro-batch of ``shape`` on the DeepSpeed engine's step (see the
    module docstring); ``keep_grads`` as in activation_memory.measure_step_activations.
    ``micro_batch_size`` x ``seq_length``: the NTP rows that ride with it when alpha < 1."""
    from ..attention.hf import use_gem_attention
    from ..gem.losses import Distillation
    from ..hf.model import GEMModel
    from .deepspeed_engine import DeepSpeedPasses
    from .step_plan import StepPlan, run_step

    if train_mode not in ("full", "summary"):
        raise ValueError(f"train_mode must be 'full' or 'summary', got {train_mode!r}")
    if not 0.0 < shape.alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1] for a contrastive step, got {shape.alpha}")
    gem = gem_config_for(train_mode, alpha=shape.alpha, teacher=bool(shape.teacher_dim))
    cl = contrastive_batch(shape, seq_length=seq_length, train_mode=train_mode)
    ntp = ntp_batch(micro_batch_size, seq_length, summary=train_mode == "summary") if shape.alpha < 1 else None
    lm = fake_model(hf_config, dtype=dtype, vocab_size=vocab_size)
    with torch.device("meta"):  # the adapter and the logit scale too: no memory, no init (values do not matter)
        model = GEMModel(lm, gem, fast_summary=fast_summary)
        if dtype == torch.bfloat16:
            model.logit_scale.to(torch.bfloat16)  # as the DeepSpeed engine does for bf16
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        use_gem_attention(lm, backend=backend)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        tracker = RealMetadataTracker(loss_module=model.head_losses)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: tracker.gradient_made(p, keep_grads))
        owner = SimpleNamespace(
            engine=_Engine(model), device=torch.device("cpu"), gather_keys=None, distill=Distillation.from_config(gem), _own_grad_norm=False
        )
        w_ntp, w_cl = 1.0 - shape.alpha, shape.alpha
        passes = DeepSpeedPasses(owner, ntp_scale=w_ntp / max(micro_batch_size * seq_length, 1), w_cl=w_cl, accum=1)
        plan = StepPlan(summary_positions=train_mode == "summary" and fast_summary, grad_cache="chunks" in cl)
        with tracker:
            run_step(plan, passes, [ntp] if ntp is not None else [], [cl], w_cl=w_cl, distill=owner.distill)
    backward = tracker.at_backward_peak if tracker.backward_peak else tracker.at_peak
    return ActivationPeak(overall=Composition(**tracker.at_peak), backward=Composition(**backward))


def contrastive_tokens(shape: ContrastiveShape, *, seq_length: int, train_mode: str = "full") -> tuple[int, int]:
    """(rows of ``seq_length``, of them in the largest forward) of a micro-batch of ``shape``:
    the packed rows the step runs (all of them; with GradCache, one chunk's)."""
    b = contrastive_batch(shape, seq_length=seq_length, train_mode=train_mode)
    parts = b.get("chunks", [b])
    return sum(int(p["input_ids"].shape[0]) for p in parts), max(int(p["input_ids"].shape[0]) for p in parts)


def measure_megatron_contrastive_step(
    hf_config,
    layout,
    shape: ContrastiveShape,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    dtype: torch.dtype,
    recompute: bool,
    backend: str,
    train_mode: str,
    adapter_rank: int = 16,
) -> ActivationPeak:
    """A phase-2 micro-batch on megatron-core's own model running that engine's passes
    (memory_estimate.megatron_activations with ``phase2``); under PP the contrastive rows fixed
    as the engine fixes them (megatron_engine.contrastive_rows)."""
    from dataclasses import asdict

    from .megatron_engine import contrastive_rows
    from .memory_estimate import megatron_activations

    rows = contrastive_rows(shape.batch_size, seq_length, min(seq_length, shape.max_length), shape.negatives) if layout.pp > 1 else None
    return megatron_activations(
        hf_config,
        layout,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        vocab_size=vocab_size,
        dtype=dtype,
        recompute=recompute,
        backend=backend,
        train_mode=train_mode,
        adapter_rank=adapter_rank,
        phase2=asdict(shape),
        contrastive_rows=rows,
    )


def estimate_contrastive_memory(
    hf_config,
    layout,
    shape: ContrastiveShape,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    bf16: bool = True,
    train_mode: str = "full",
    gradient_checkpointing: bool = False,
    adapter_rank: int = 16,
    activations: ActivationPeak | None = None,
    backend: str = "triton",
    optimizer: str = "fused_adam",
    num_microbatches: int = 1,
):
    """Peak bytes per rank of one phase-2 step (memory_estimate.MemoryEstimate): the states by
    memory_estimate.py's sharding rules, the micro-batch measured by ``measure_contrastive_step``,
    and a teacher's fp32 weights (``shape.teacher_params``; Teacher.from_pretrained puts them on
    the engine's device for the whole run) in "parameters". The teacher's own forward runs
    before the step, without autograd and while none of the step's activations live: its
    activations (a batch of texts, no graph) are not in the peak. A megatron-core layout's
    micro-batch is measured on megatron-core's own model running that engine's passes
    (mcore_activation_memory.py, ``phase2``; its stage's layers, its TP shard; under PP the
    contrastive rows fixed as the engine fixes them, and min(PP, micro-batches) in flight as
    in phase 1: an upper bound, not validated)."""
    from dataclasses import replace

    from .memory_estimate import estimate_step_memory, keeps_whole_grads

    if activations is None and layout.engine == "megatron":
        activations = measure_megatron_contrastive_step(
            hf_config,
            layout,
            shape,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            recompute=gradient_checkpointing,
            backend=backend,
            train_mode=train_mode,
            adapter_rank=adapter_rank,
        )
    if activations is None:
        activations = measure_contrastive_step(
            hf_config,
            shape,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            vocab_size=vocab_size,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            train_mode=train_mode,
            gradient_checkpointing=gradient_checkpointing,
            keep_grads=keeps_whole_grads(layout, train_mode),
            backend=backend,
        )
    e = estimate_step_memory(
        hf_config,
        layout,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        vocab_size=vocab_size,
        bf16=bf16,
        train_mode=train_mode,
        gradient_checkpointing=gradient_checkpointing,
        adapter_rank=adapter_rank,
        activations=activations,
        backend=backend,
        optimizer=optimizer,
        num_microbatches=num_microbatches,
    )
    return replace(e, parameters=e.parameters + 4 * shape.teacher_params)
