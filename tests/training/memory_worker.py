"""One process: a small Llama trained with the real DeepSpeed engine on CPU (fp32, gloo, one
rank), its peak memory during a steady-state step measured from the CPU allocator's own
records (torch.profiler profile_memory: every allocation and free, in order). Prints one JSON
line. The oracle of tests/training/test_memory_estimate.py: nothing here uses the estimator.

usage: memory_worker.py STAGE MICRO_BATCH SEQ_LENGTH [--gradient-checkpointing] [--summary]
                        [--phase2 PAIRS MAX_LENGTH [--chunk C] [--alpha A]]

--summary: summary mode (the base frozen, rank-16 deltas at each document's summary token,
which sits SUMMARY_AT tokens into the document; the rest of the document is its suffix).
--phase2: a contrastive step instead (the DeepSpeed engine's passes, training/deepspeed_engine.py
DeepSpeedPasses through training/step_plan.py run_step, as DeepSpeedEngine.train_step runs them):
PAIRS anchors and positives of MAX_LENGTH tokens packed into rows of SEQ_LENGTH (the data set's
own collation), GradCache chunks of C anchors (--chunk), and with --alpha A < 1 a micro-batch of
MICRO_BATCH NTP rows weighted 1 - A riding with it.
"""

import gc
import json
import os
import sys

import torch

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 1024, 4, 8, 4, 4096
DOC_LEN = 128  # packed rows: a new document every DOC_LEN tokens (the dense GEM-mask path)
SUMMARY_AT = 96


def config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        use_cache=False,
        tie_word_embeddings=False,
    )


def _walk(nodes):
    for n in nodes:
        yield n
        yield from _walk(n.children)


def live_bytes_peak(prof, name: str, skip: int) -> tuple[int, int]:
    """(live bytes when the first counted ``name`` range starts, the peak over the counted
    ranges): the CPU allocator's running total of allocated bytes, as it reports each
    allocation and free to the profiler (everything since the profiler started, which was
    before the model existed). The first ``skip`` ranges are not counted."""
    from torch._C._profiler import _EventType

    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    allocs = sorted((n.start_time_ns, n.extra_fields.total_allocated) for n in nodes if n.tag == _EventType.Allocation)
    ranges = sorted((n.start_time_ns, n.end_time_ns) for n in nodes if n.name == name)[skip:]
    before = [total for t, total in allocs if t < ranges[0][0]]
    inside = [total for t, total in allocs if any(a <= t <= b for a, b in ranges)]
    return (before[-1] if before else 0), max(inside)


def _flag(name, cast, default=None):
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def ntp_step(engine, batch, mb, seq):
    loss = engine(batch, "ntp_losses").sum() / (mb * seq)
    engine.backward(loss)
    engine.step()


def phase2_step(engine, model, phase2, ntp_batch, mb, seq):
    """One phase-2 step as DeepSpeedEngine.train_step runs it (without the metrics record)."""
    from types import SimpleNamespace

    from megatron_gem.gem.losses import Distillation
    from megatron_gem.training.contrastive_memory import ContrastiveShape, contrastive_batch
    from megatron_gem.training.deepspeed_engine import DeepSpeedPasses
    from megatron_gem.training.step_plan import StepPlan, run_step

    pairs, max_length, chunk, alpha = phase2
    cl = contrastive_batch(ContrastiveShape(pairs, max_length, chunk=chunk), seq_length=seq, train_mode="summary" if model.summary_mode else "full")
    owner = SimpleNamespace(engine=engine, device=torch.device("cpu"), gather_keys=None, distill=Distillation(1.0, 0.05), _own_grad_norm=False)
    passes = DeepSpeedPasses(owner, ntp_scale=(1 - alpha) / (mb * seq), w_cl=alpha, accum=1)
    plan = StepPlan(summary_positions=model.summary_mode and model.fast_summary, grad_cache="chunks" in cl)
    run_step(plan, passes, [ntp_batch] if alpha < 1 else [], [cl], w_cl=alpha, distill=owner.distill)


def main():
    stage, mb, seq = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    checkpointing = "--gradient-checkpointing" in sys.argv
    summary = "--summary" in sys.argv
    phase2 = None
    if "--phase2" in sys.argv:
        i = sys.argv.index("--phase2")
        phase2 = (int(sys.argv[i + 1]), int(sys.argv[i + 2]), _flag("--chunk", int), _flag("--alpha", float, 1.0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    from transformers import LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.model import GEMModel, param_groups
    from megatron_gem.training.process_setup import init_deepspeed_distributed

    init_deepspeed_distributed()
    import deepspeed.comm as ds_comm

    # One process: an all-reduce is the identity, so it is skipped. Through gloo, its worker thread
    # can hold the reduced tensor past wait() and free it a moment later from that thread: on a
    # loaded machine ZeRO-0's flat gradient buffer (24 MB here) then outlived its step into the
    # next forward (240 instead of 216 MB, once in three fresh-clone runs): a figure of the thread
    # scheduler, not of the step.
    ds_comm.all_reduce = lambda tensor, *args, **kwargs: None
    ds_config = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": HIDDEN * HIDDEN,
            "stage3_prefetch_bucket_size": HIDDEN * HIDDEN,
            "stage3_param_persistence_threshold": 10 * HIDDEN,
        },
        "steps_per_print": 10**9,
    }
    torch.manual_seed(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        lm = LlamaForCausalLM(config())
        use_gem_attention(lm, backend="sdpa")
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gem = GEMConfig(train_mode="summary", num_special_tokens=1, special_token_ids=[5], adapter_rank=16) if summary else GEMConfig()
        model = GEMModel(lm, gem)
        optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        ids = torch.randint(4, VOCAB, (mb, seq))
        pos = (torch.arange(seq) % DOC_LEN).expand(mb, seq)
        doc = (torch.arange(seq) // DOC_LEN).expand(mb, seq).contiguous()
        roles = torch.zeros_like(ids)
        if summary:  # PREFIX ... SPECIAL (the summary token) SUFFIX ... in every document
            roles = ((pos >= SUMMARY_AT).long() * 2 - (pos == SUMMARY_AT).long()).contiguous()
        batch = {"input_ids": ids, "position_ids": pos, "doc_ids": doc, "roles": roles, "labels": ids.clone()}
        run = (lambda: phase2_step(engine, model, phase2, batch, mb, seq)) if phase2 else (lambda: ntp_step(engine, batch, mb, seq))
        for _ in range(3):  # the first step creates the optimizer state; the peak is read in the later ones
            # Python's cyclic collector runs between steps, never inside one: where it runs inside a
            # step it can leave a gradient-sized buffer of DeepSpeed's (ZeRO-0 on CPU) alive across
            # the next forward, depending only on when the collector's thresholds fall (+24 MB
            # seen with HF_HUB_OFFLINE=1 set, no other change); the figure would then depend on the
            # environment, not on the step.
            gc.collect()
            gc.disable()
            with torch.profiler.record_function("gem_step"):
                run()
            gc.enable()
    at_start, peak = live_bytes_peak(prof, "gem_step", skip=1)
    print(
        json.dumps({"stage": stage, "micro_batch": mb, "seq_length": seq, "summary": summary, "phase2": phase2, "live_at_step_start": at_start, "peak": peak})
    )


if __name__ == "__main__":
    main()
