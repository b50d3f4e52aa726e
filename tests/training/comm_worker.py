"""One rank of a 2-process DeepSpeed ZeRO run on CPU (gloo) of the small Llama of
memory_worker.py: the torch.distributed collectives of one steady-state training step are
hooked and their payload bytes counted by kind (all-gather: the gathered tensor; reduce-
scatter: the tensor reduced; all-reduce: the tensor). Rank 0 prints one JSON line. The oracle
of tests/training/test_communication.py: nothing here uses the estimator's arithmetic.

usage (torchrun --nproc-per-node 2): comm_worker.py STAGE ACCUMULATION
"""

import collections
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import memory_worker as W  # noqa: E402

KINDS = {
    "all_reduce": "all_reduce",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "all_to_all_single": "all_to_all",
}
counted = collections.Counter()
counting = False


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _hook(name, fn):
    kind = KINDS[name]
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        if counting:
            bound = list(signature.bind(*args, **kwargs).arguments.values())
            # reduce-scatter: the tensor reduced is the input (second argument); every other
            # kind: the first argument (all-gather's gathered output, the reduced/sent tensor)
            counted[kind] += _nbytes(bound[1] if kind == "reduce_scatter" else bound[0])
            counted[kind + "_calls"] += 1
        return fn(*args, **kwargs)

    return wrapped


def main():
    stage, accum = int(sys.argv[1]), int(sys.argv[2])
    global counting
    for name in KINDS:  # before DeepSpeed binds them
        if hasattr(dist, name):
            setattr(dist, name, _hook(name, getattr(dist, name)))
    import deepspeed
    from transformers import LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.model import GEMModel, param_groups
    from megatron_gem.training.process_setup import init_deepspeed_distributed

    init_deepspeed_distributed()
    mb, seq = 1, 256
    ds_config = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": W.HIDDEN * W.HIDDEN,
            "stage3_prefetch_bucket_size": W.HIDDEN * W.HIDDEN,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
        },
        "steps_per_print": 10**9,
    }
    torch.manual_seed(0)
    lm = LlamaForCausalLM(W.config())
    use_gem_attention(lm, backend="sdpa")
    model = GEMModel(lm, GEMConfig())
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(4, W.VOCAB, (mb, seq))
    pos = torch.arange(seq).expand(mb, seq)
    batch = {"input_ids": ids, "position_ids": pos, "doc_ids": torch.zeros_like(ids), "roles": torch.zeros_like(ids), "labels": ids.clone()}
    for step in range(2):
        counting = step == 1  # the first step also makes the optimizer state
        for _ in range(accum):
            loss = engine(batch, "ntp_losses").mean()
            engine.backward(loss)
            engine.step()
    counting = False
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    if dist.get_rank() == 0:
        print(json.dumps({"stage": stage, "accumulation": accum, "params": params, "counted": counted}))


if __name__ == "__main__":
    main()
