"""The activation memory of one megatron-core GEM micro-batch on one tensor-parallel rank,
measured on fake tensors with megatron-core's own model (mcore/gpt_model.py): the estimator's
megatron-core measurement (training/memory_estimate.py). The HF model it measures for
DeepSpeed keeps other tensors than megatron-core's layers do (the fused QKV output stays
whole while V is saved; the gated MLP saves a copy of its linear half), and tensor and
sequence parallelism decide which tensors are split: so the megatron-core model itself runs.

How, without GPUs or peers: torch.distributed's "fake" process group of TP ranks (this
process is rank 0; its collectives return at once, touching nothing) carries megatron-core's
TP groups, so every layer is built and runs as on a real TP rank (its shards of the heads,
FFN and vocabulary; with sequence parallelism its sequence shard of the hidden-size tensors,
and the gathered/reduce-scattered buffers the collectives write into); the model is built on
the meta device and given fake CPU storage (FakeTensorMode); StorageTracker
(training/activation_memory.py) counts what forward and backward allocate. The CPU shims
(mcore/cpu_shims.py) and a process group are set up, so this runs in a child process of its
own (``measure_megatron_activations`` starts it), never in the caller's.

  python -m megatron_gem.training.mcore_activation_memory '<JSON of measure()'s arguments>'   prints one JSON line
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys


def measure_megatron_activations(hf_config, with_saved: bool = False, **kwargs):
    """``measure``'s ActivationPeak, measured in a child process (see the module docstring).
    ``hf_config``: a transformers config; ``kwargs``: measure()'s other arguments;
    ``with_saved``: (ActivationPeak, Composition at the end of the forward)."""
    from .activation_memory import ActivationPeak, Composition

    spec = {"hf_config": hf_config.to_dict(), **kwargs}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}  # fake CPU tensors: no GPU needed or touched
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "megatron_gem.training.mcore_activation_memory", json.dumps(spec)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"megatron_gem/training/mcore_activation_memory.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = ActivationPeak(overall=Composition(**out["overall"]), backward=Composition(**out["backward"]))
    return (peak, Composition(**out["saved"])) if with_saved else peak


def measure(
    hf_config: dict,
    *,
    tp: int,
    num_layers: int,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    dtype: str = "bfloat16",
    sequence_parallel: bool = False,
    recompute: bool = False,
    backend: str = "triton",
    train_mode: str = "full",
    adapter_rank: int = 16,
    phase2: dict | None = None,
    contrastive_rows: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> dict:
    """One micro-batch of packed NTP rows [micro_batch_size, seq_length] through the GEM
    GPTModel of one TP rank of ``num_layers`` layers (a pipeline stage's; embedding and LM head
    both, an upper bound for a middle stage): forward with labels (the vocabulary-parallel
    chunked loss, mcore/loss.py), the losses summed, backward. Parameter gradients are dropped
    as they are made: megatron-core's DDP adds them into its fp32 grad buffer, which the
    estimator counts as resident. ``vocab_size``: the padded vocabulary (all TP ranks').
    In this process: it initialises torch.distributed (run it in a child process).

    ``train_mode="summary"``: the base frozen and mcore/summary.py's adapter attached (rank
    ``adapter_rank`` deltas on every decoder linear layer, split over TP as the real ones are).
    Its deltas act at the summary tokens, found from the batch's roles (a ``nonzero``), so the
    batch's metadata is real (step_inputs.RealMetadataTracker): documents of
    step_inputs.SUMMARY_DOC_LEN tokens packed into the rows, each with its summary token
    at SUMMARY_AT and its suffix after (the delta path's own tensors are a few rows per document: its share of
    the peak hardly depends on where they are). What the frozen layers keep for backward
    (megatron-core's linears save their input only for a weight gradient) is what the
    measurement is for.

    ``pre_process`` / ``post_process``: one pipeline stage as megatron-core builds it (the first:
    the embedding, no LM head; the last: its input [s, b, h] received from the previous stage,
    the LM head and loss; a stage without the head is back-propagated from a received gradient
    of its output's shape). Besides the peak, ``saved``: what is live when the forward ends (the
    tensors kept for backward and the output the schedule holds), which each further micro-batch
    in flight on the stage adds (memory_estimate.py).

    ``phase2`` (step_inputs.ContrastiveShape's fields): a phase-2 step instead, the
    megatron-core engine's own passes (training/megatron_engine.py MegatronPasses through
    training/step_plan.py run_step, each pass through megatron-core's forward_backward_func:
    the joined NTP and contrastive rows, GradCache's no-grad pass and chunks with the surrogate
    loss, summary mode's prefill pass and summary step) on a real contrastive micro-batch
    (step_inputs.contrastive_batch, the data set's collation; ``contrastive_rows``
    rows when given, as MegatronEngine.adapt_loaders fixes them under PP), with
    ``micro_batch_size`` x ``seq_length`` NTP rows when alpha < 1; its metadata real
    (step_inputs.RealMetadataTracker), the model fake. DDP, its no-sync and the
    gradient finalisation are not run (the fp32 grad buffer is counted as resident; the
    parameters' gradients are dropped as made, as DDP's hooks move them into it)."""
    from dataclasses import asdict

    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoConfig

    from ..attention.megatron import gem_mask_info
    from ..common import distributed as D
    from ..mcore import cpu_shims
    from .activation_memory import Composition, StorageTracker
    from .step_inputs import RealMetadataTracker, summary_documents

    if train_mode not in ("full", "summary"):
        raise ValueError(f"train_mode must be 'full' or 'summary', got {train_mode!r}")
    if train_mode == "summary" and sequence_parallel:
        raise ValueError("summary mode does not run with sequence parallelism (mcore/summary.py attach_summary_adapter refuses it)")
    cpu_shims.apply()
    D.BACKEND_DEVICE["fake"] = "cpu"  # the fake group's "tensors" are fake CPU ones
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # The model-parallel RNG tracker swaps generator states around the embedding's dropout;
    # fake generator states cannot be read back. GEM's configs have no dropout (p = 0): the
    # swap changes nothing there, so it is skipped.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()

    from ..mcore.gpt_model import build_gem_gpt_model
    from ..mcore.llama import arch_from_hf_config, transformer_config

    fields = dict(hf_config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items() if k not in ("transformers_version",)})
    cfg.num_hidden_layers = num_layers
    arch = arch_from_hf_config(cfg)
    config = transformer_config(
        arch,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        recompute_granularity="full" if recompute else None,
        params_dtype=getattr(torch, dtype),
        use_cpu_initialization=True,
    )
    with torch.device("meta"):  # no memory, no initialisation
        model = build_gem_gpt_model(
            arch, config, vocab_size=vocab_size, padded_vocab=vocab_size, backend=backend, pre_process=pre_process, post_process=post_process
        )
    summary = train_mode == "summary"
    if phase2 is not None:
        return _measure_phase2(model, config, phase2, micro_batch_size, seq_length, train_mode, adapter_rank, contrastive_rows)
    if summary:  # real metadata (see the docstring), made before any fake mode
        doc_ids, roles, positions = summary_documents(micro_batch_size, seq_length)
        info = gem_mask_info(doc_ids, roles)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.train()
        if summary:
            from ..gem.config import GEMConfig
            from ..mcore.summary import attach_summary_adapter

            attach_summary_adapter(model, GEMConfig(special_token_ids=[1], train_mode="summary", adapter_rank=adapter_rank), seed=0)
        tracker = RealMetadataTracker() if summary else StorageTracker()
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: tracker.gradient_made(p, False))
        ids = torch.zeros((micro_batch_size, seq_length), dtype=torch.long)
        if not summary:
            positions, info = ids, gem_mask_info(ids, ids)
        rows = seq_length // tp if sequence_parallel else seq_length  # a stage's input / output [s, b, h]
        boundary = (rows, micro_batch_size, arch.hidden_size)
        with tracker, _labelled_loss(tracker):
            if not pre_process:  # the tensor received from the previous stage (its buffer is this stage's)
                received = torch.empty(boundary, dtype=getattr(torch, dtype), requires_grad=True)
                model.set_input_tensor(received)
            out = model(ids if pre_process else None, positions, info, ntp_rows=micro_batch_size, labels=ids)
            saved = dict(tracker.by_label)
            if post_process:
                losses, _ = out
                loss = losses.sum()
                del losses, out
                loss.backward()
            else:  # the gradient received from the next stage
                out.backward(torch.empty(boundary, dtype=out.dtype))
                del out
    backward = tracker.at_backward_peak if tracker.backward_peak else tracker.at_peak
    return {"overall": asdict(Composition(**tracker.at_peak)), "backward": asdict(Composition(**backward)), "saved": asdict(Composition(**saved))}


def _measure_phase2(model, config, phase2: dict, micro_batch_size: int, seq_length: int, train_mode: str, adapter_rank: int, rows: int | None) -> dict:
    """measure()'s phase-2 step (see its docstring) on the built meta ``model``."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..gem.losses import Distillation
    from .activation_memory import Composition
    from .megatron_engine import MegatronEngine, MegatronPasses, StepLoss
    from .step_inputs import ContrastiveShape, RealMetadataTracker, contrastive_batch, gem_config_for, ntp_batch
    from .step_plan import StepPlan, run_step

    shape = ContrastiveShape(**phase2)
    summary = train_mode == "summary"
    gem = gem_config_for(train_mode, alpha=shape.alpha, teacher=bool(shape.teacher_dim))
    cl = contrastive_batch(shape, seq_length=seq_length, train_mode=train_mode, num_rows=rows)
    ntp = ntp_batch(micro_batch_size, seq_length, summary=summary) if shape.alpha < 1 else None
    # megatron-core's schedule reads these of the config; DDP's no-sync, gradient finalisation
    # and loss scaling are what the engine sets there (not run: see measure()'s docstring)
    config.finalize_model_grads_func = config.no_sync_func = config.grad_scale_func = None
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.train()
        if summary:
            from ..gem.config import GEMConfig
            from ..mcore.summary import attach_summary_adapter

            attach_summary_adapter(model, GEMConfig(special_token_ids=[1], train_mode="summary", adapter_rank=adapter_rank), seed=0)
        tracker = RealMetadataTracker()
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: tracker.gradient_made(p, False))
        engine = MegatronEngine.__new__(MegatronEngine)  # what MegatronPasses reads of the engine
        engine.ddp, engine.model, engine.config, engine.device = model, model, config, torch.device("cpu")
        engine.forward_backward = get_forward_backward_func()
        engine.job = SimpleNamespace(batch=SimpleNamespace(seq_length=seq_length))
        job = SimpleNamespace(gem=SimpleNamespace(summary_mode=summary), model=SimpleNamespace(summary_fast_path=True))
        plan = StepPlan.of(job, [cl], prefill_pass=True)
        distill = Distillation.from_config(gem)
        w_ntp, w_cl = 1.0 - shape.alpha, shape.alpha
        passes = MegatronPasses(engine, StepLoss(w_ntp=w_ntp, w_cl=w_cl, ntp_scale=w_ntp / (micro_batch_size * seq_length), gather_keys=None, distill=distill))
        with tracker, _labelled_loss(tracker):
            run_step(plan, passes, [ntp] if ntp is not None else [], [cl], w_cl=w_cl, gather_keys=None, distill=distill)
    backward = tracker.at_backward_peak if tracker.backward_peak else tracker.at_peak
    return {"overall": asdict(Composition(**tracker.at_peak)), "backward": asdict(Composition(**backward))}


@contextlib.contextmanager
def _labelled_loss(tracker):
    """What the vocabulary-parallel loss allocates in forward counts as "logits_loss" (its
    backward is labelled by its autograd node, as for the HF model)."""
    from ..mcore import loss

    inner = loss.vocab_parallel_token_losses

    def labelled(*args, **kwargs):
        tracker._enter_loss()
        try:
            return inner(*args, **kwargs)
        finally:
            tracker._leave_loss()

    loss.vocab_parallel_token_losses = labelled
    try:
        yield
    finally:
        loss.vocab_parallel_token_losses = inner


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
