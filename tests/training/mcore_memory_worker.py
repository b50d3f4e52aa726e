"""One rank of a small megatron-core GEM model trained on CPU (fp32, gloo) as train.py's
megatron engine builds it (training/megatron_engine.py MegatronEngine.build: megatron-core's
DistributedDataParallel with fp32 gradient buffers, get_megatron_optimizer with the
distributed optimizer, torch Adam on CPU), one NTP micro-batch per step through megatron-core's
forward_backward_func, then the optimizer step. Two things are measured in a steady-state
step (the first step makes the optimizer state and is not counted):

* memory: the peak of the CPU allocator's live bytes (torch.profiler profile_memory, as
  tests/training/memory_worker.py reads it for DeepSpeed), per rank;
* communication: the payload bytes of the torch.distributed collectives by kind (hooked as
  tests/training/comm_worker.py hooks them), per rank.

Every rank prints one JSON line. The oracle of tests/training/test_memory_estimate.py and
test_communication.py's megatron cases: nothing here uses the estimator.

usage: torchrun --nproc-per-node TP mcore_memory_worker.py TP MICRO_BATCH SEQ_LENGTH
       [--recompute] [--sequence-parallel] [--local-collectives] [--summary]
       [--phase2 PAIRS MAX_LENGTH [--chunk C] [--alpha A]] [--pp P --microbatches M]

--pp P: pipeline parallelism over P stages (torchrun --nproc-per-node TP x P), M micro-batches
per step through megatron-core's 1F1B schedule (--microbatches, default 1). The point-to-point
sends between stages are counted too ("p2p_sent"/"p2p_recv": the bytes of the tensors this rank
sends to / receives from its neighbours, hooked at torch.distributed.batch_isend_irecv, through
which megatron-core's p2p_communication sends everything with batch_p2p_comm, its default).

--phase2: a contrastive step instead, as MegatronEngine.train_step runs it: the engine's own
passes (training/megatron_engine.py MegatronPasses through training/step_plan.py run_step,
each pass one forward_backward_func call; GradCache chunks of C anchors with --chunk; summary
mode's fast path with --summary: the no-grad prefill pass, then the summary step) on PAIRS
anchors and positives of MAX_LENGTH tokens packed into rows of SEQ_LENGTH by the data set's own
collation (contrastive_memory.contrastive_batch), and with --alpha A < 1 the MICRO_BATCH NTP
rows weighted 1 - A joined to it (a pass of their own in summary mode).

--summary: summary mode as the engine builds it (mcore/summary.py attach_summary_adapter: the
base frozen, rank-16 deltas on every decoder linear layer, only they and the logit scale in
DDP's buffers and the optimizer), the deltas acting at each document's summary token, which
sits memory_worker.SUMMARY_AT tokens into the document (the rest of it its suffix).

--local-collectives: the TP group's collectives are done by each rank alone (``_local``: the
same tensors, no gloo; nothing counted). Through gloo a rank's peak moves by up to 20% from
run to run, one rank or the other at random: gloo frees some of a collective's tensors from
its own worker thread, on a loaded machine late (with the TP collectives done locally the
same steps peak at the same bytes on both ranks, every run). This measures the step's own
allocations on the real allocator; the gloo run measures them with gloo's timing on top.
"""

import gc
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import comm_worker as C  # noqa: E402  (the collective hooks)
import memory_worker as W  # noqa: E402  (the model shape, the allocator reading)

DOC_LEN = W.DOC_LEN
LOCAL_COLLECTIVES = "--local-collectives" in sys.argv


class _Done:
    """The handle of a collective that had nothing to do (async_op=True callers wait on it)."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _identity(name, bound: dict):
    """A collective over a one-rank group: the result is the input. All-reduce leaves the
    tensor as it is; reduce-scatter and all-gather copy the input into the output when they
    are different tensors (megatron-core's distributed optimizer passes a view of its grad
    buffer as both)."""
    if name.startswith(("reduce_scatter", "_reduce_scatter", "all_gather_into", "_all_gather")):
        out, inp = list(bound.values())[:2]
        if out.data_ptr() != inp.data_ptr() or out.shape != inp.shape:
            out.copy_(inp.view_as(out))
    return _Done() if bound.get("async_op") else None


def _local(name, bound: dict):
    """--local-collectives: a collective over the TP group done by this rank alone, into the
    same tensors (nothing allocated): an all-reduce keeps the rank's own values, an all-gather
    repeats its shard, a reduce-scatter takes its slice. The step's shapes and allocations are
    those of the real step; its numbers are not a TP result (the memory does not depend on
    them)."""
    if name.startswith(("all_gather_into", "_all_gather")):
        out, inp = list(bound.values())[:2]
        n = out.numel() // inp.numel()
        out.view(n, -1).copy_(inp.reshape(1, -1).expand(n, -1))
    elif name.startswith(("reduce_scatter", "_reduce_scatter")):
        out, inp = list(bound.values())[:2]
        n = inp.numel() // out.numel()
        out.copy_(inp.reshape(n, -1)[dist.get_rank(bound.get("group"))].view_as(out))
    elif name != "all_reduce":
        raise NotImplementedError(f"--local-collectives: {name}")
    return _Done() if bound.get("async_op") else None


def _hook(name, fn):
    """comm_worker.py's counting, for collectives over more than one rank only. With dp = 1
    megatron-core's distributed optimizer still reduce-scatters its gradient buffer and
    all-gathers its parameters over the one-rank data-parallel group, which moves nothing:
    those run as the identity here, not through gloo. Through gloo, the reduce-scatter cloned
    the 12 MB gradient buffer and its worker thread freed the clone when it next ran, on a
    loaded machine sometimes only after the next step's peak (+12 MB on one rank or the
    other, at random): a figure of the thread scheduler and of gloo's one-rank path, not of
    the step (the same reason as memory_worker.py's skipped one-process all-reduce)."""
    counted_fn = C._hook(name, fn)
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        if dist.get_world_size(bound.get("group")) == 1:
            return _identity(name, bound)
        if LOCAL_COLLECTIVES:
            return _local(name, bound)
        return counted_fn(*args, **kwargs)

    return wrapped


def init_weights(model) -> None:
    """The model is built without initialisation (weights come from a checkpoint in training):
    small normal weights, unit norms, so the step's numbers are finite."""
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(tp: int, recompute: bool, sequence_parallel: bool, summary: bool = False, pp: int = 1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_gem.mcore.gpt_model import build_gem_gpt_model
    from megatron_gem.mcore.llama import arch_from_hf_config, padded_vocab_size, transformer_config

    arch = arch_from_hf_config(W.config())
    config = transformer_config(
        arch,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        recompute_granularity="full" if recompute else None,
        params_dtype=torch.float32,
    )
    assert config.batch_p2p_comm, "the p2p count hooks batch_isend_irecv"
    model = build_gem_gpt_model(arch, config, vocab_size=W.VOCAB, padded_vocab=padded_vocab_size(W.VOCAB, tp), backend="sdpa")
    init_weights(model)
    if summary:  # as mcore/provider.py build_gem_model does after loading the base
        from megatron_gem.gem.config import GEMConfig
        from megatron_gem.mcore.summary import attach_summary_adapter

        attach_summary_adapter(model, GEMConfig(train_mode="summary", num_special_tokens=1, special_token_ids=[5], adapter_rank=16), seed=0)
    # What MegatronEngine.build makes of it (train.py's defaults: the distributed optimizer on).
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-4, weight_decay=0.0, adam_eps=1e-8, clip_grad=1.0, bf16=False, params_dtype=torch.float32, use_distributed_optimizer=True
        ),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_scale_func = optimizer.scale_loss
    ddp.train()
    return model, ddp, optimizer


def _count_p2p(fn):
    """torch.distributed.batch_isend_irecv, counting the bytes of its sends and receives (only
    with C.counting). Its P2POps are built on torch.distributed's own isend / irecv, which
    P2POp checks by identity: those cannot be wrapped themselves."""

    def wrapped(ops):
        if C.counting:
            for op in ops:
                kind = "p2p_sent" if op.op.__name__ == "isend" else "p2p_recv"
                C.counted[kind] += op.tensor.numel() * op.tensor.element_size()
                C.counted[kind + "_calls"] += 1
        return fn(ops)

    return wrapped


def _flag(name, cast, default=None):
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def phase2_step(ddp, config, phase2, ntp_batch: dict, mb: int, seq: int, summary: bool) -> None:
    """One phase-2 step's passes as MegatronEngine.train_step runs them (the engine object
    carries only what MegatronPasses reads of it; the metrics record is left out)."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gem.gem.losses import Distillation
    from megatron_gem.training.contrastive_memory import ContrastiveShape, contrastive_batch
    from megatron_gem.training.megatron_engine import MegatronEngine, MegatronPasses, StepLoss
    from megatron_gem.training.step_plan import StepPlan, run_step

    pairs, max_length, chunk, alpha = phase2
    cl = contrastive_batch(ContrastiveShape(pairs, max_length, chunk=chunk), seq_length=seq, train_mode="summary" if summary else "full")
    engine = MegatronEngine.__new__(MegatronEngine)
    engine.ddp, engine.model, engine.config, engine.device = ddp, ddp.module, config, torch.device("cpu")
    engine.forward_backward = get_forward_backward_func()
    engine.job = SimpleNamespace(batch=SimpleNamespace(seq_length=seq))
    job = SimpleNamespace(gem=SimpleNamespace(summary_mode=summary), model=SimpleNamespace(summary_fast_path=True))
    plan = StepPlan.of(job, [cl], prefill_pass=True)
    distill = Distillation(1.0, 0.05)
    passes = MegatronPasses(engine, StepLoss(w_ntp=1 - alpha, w_cl=alpha, ntp_scale=(1 - alpha) / (mb * seq), gather_keys=None, distill=distill))
    run_step(plan, passes, [ntp_batch] if alpha < 1 else [], [cl], w_cl=alpha, gather_keys=None, distill=distill)


def main():
    tp, mb, seq = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    phase2 = None
    if "--phase2" in sys.argv:
        i = sys.argv.index("--phase2")
        phase2 = (int(sys.argv[i + 1]), int(sys.argv[i + 2]), _flag("--chunk", int), _flag("--alpha", float, 1.0))
    recompute = "--recompute" in sys.argv
    sequence_parallel = "--sequence-parallel" in sys.argv
    summary = "--summary" in sys.argv
    pp, micro = _flag("--pp", int, 1), _flag("--microbatches", int, 1)
    for name in C.KINDS:  # before megatron-core binds them
        if hasattr(dist, name):
            setattr(dist, name, _hook(name, getattr(dist, name)))
    dist.batch_isend_irecv = _count_p2p(dist.batch_isend_irecv)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.mcore.runtime import init_model_parallel

    init_model_parallel(tp, pp, seed=0)
    torch.manual_seed(0)  # the same batch on every TP rank (a TP group shares its rows)
    ids = torch.randint(4, W.VOCAB, (mb, seq))
    pos = (torch.arange(seq) % DOC_LEN).expand(mb, seq).contiguous()
    doc = (torch.arange(seq) // DOC_LEN).expand(mb, seq).contiguous()
    roles = torch.zeros_like(ids)
    if summary:  # PREFIX ... SPECIAL (the summary token) SUFFIX ... in every document
        roles = ((pos >= W.SUMMARY_AT).long() * 2 - (pos == W.SUMMARY_AT).long()).contiguous()
    mask = gem_mask_info(doc, roles)
    labels = torch.roll(ids, -1, dims=1)
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, model):
        next(data_iterator)
        # the first stage embeds ids; a later one takes its input from the previous stage; the
        # last returns (token losses, states), an earlier one its hidden states
        output = model(ids, pos, mask, ntp_rows=mb, labels=labels)
        return output, lambda out: (out[0].sum() / (micro * mb * seq), {})

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model, ddp, optimizer = build(tp, recompute, sequence_parallel, summary, pp)
        for step in range(3):
            C.counting = step == 2  # the collectives of the last step (the first makes the optimizer state)
            gc.collect()
            gc.disable()  # as memory_worker.py: the cyclic collector runs between steps only
            with torch.profiler.record_function("gem_step"):
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                if phase2:
                    ntp = {"input_ids": ids, "position_ids": pos, "doc_ids": doc, "roles": roles, "labels": labels}
                    phase2_step(ddp, model.config, phase2, ntp, mb, seq, summary)
                else:
                    forward_backward(
                        forward_step_func=forward_step,
                        data_iterator=iter([None] * micro),
                        model=[ddp],
                        num_microbatches=micro,
                        seq_length=seq,
                        micro_batch_size=mb,
                        forward_only=False,
                    )
                ok, grad_norm, _ = optimizer.step()
            gc.enable()
            assert ok and grad_norm == grad_norm, f"step {step}: the update was skipped (grad norm {grad_norm})"
    C.counting = False
    from megatron.core import parallel_state

    at_start, peak = W.live_bytes_peak(prof, "gem_step", skip=1)
    params = sum(p.numel() for p in model.parameters())
    out = {
        "rank": dist.get_rank(),
        "tp": tp,
        "pp": pp,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "microbatches": micro,
        "micro_batch": mb,
        "seq_length": seq,
        "recompute": recompute,
        "sequence_parallel": sequence_parallel,
        "summary": summary,
        "summary_tokens": int((roles == 1).sum()) if summary else None,  # per micro-batch: what the deltas' collectives carry
        "phase2": phase2,
        "params_on_rank": params,
        "trainable_on_rank": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "live_at_step_start": at_start,
        "peak": peak,
        "counted": dict(C.counted),
        # the whole model's parameters: TP-split ones on every rank, replicated ones (norms) once
        "total_params": sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters()),
    }
    print(json.dumps(out), flush=True)
    from megatron_gem.mcore.runtime import destroy

    destroy()


if __name__ == "__main__":
    main()
