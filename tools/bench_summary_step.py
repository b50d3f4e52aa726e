#!/usr/bin/env python
"""Summary mode's phase-1 step time (--gem-train summary, the HF engine's GEMModel, what
train.py's DeepSpeed engine runs): forward + backward + AdamW over the adapter of one packed
NTP micro-batch (mixed GEM layouts, GEM attention, the adapter's deltas at the summary tokens).
The same seeded model and the same batch in every step and every run.

It times the tree it sits in: to compare two versions of the library (e.g. before and after
the deltas gathered their rows by index, issue #26 item 6), run this file from each tree on the
same machine. Reports the median seconds per step over ``--steps`` after ``--warmup``, tokens/s,
the summary tokens of the batch, and peak memory (CUDA allocated, or the process's peak RSS on
CPU). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="small",
        help="'small' (random Llama: 8 layers, hidden 512, GQA 8/4), 'tiny' (2 layers, hidden 64), 'smollm2' (packaged SmolLM2-135M) or an HF checkpoint dir",
    )
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--p-raw", type=float, default=0.5, help="share of plain documents (the rest carry summary tokens)")
    p.add_argument("--summary-tokens", nargs="+", default=None, help="existing tokens serving as summary tokens (default: '<unk>' for tiny/small)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation recomputation of every decoder layer")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: need at least one timed step and no negative warmup")
    return args


def run(args) -> dict:
    import torch

    from megatron_gem.data import InMemoryCorpus, make_ntp_loader
    from megatron_gem.gem import GEMConfig
    from megatron_gem.gem.roles import IGNORE_INDEX, PAD_DOC_ID, Role
    from megatron_gem.hf.model import GEMModel, prepare_gem_lm
    from tools.bench_train import corpus_texts, load

    torch.manual_seed(0)
    lm, tok, model_name = load(args)
    texts, corpus_name = corpus_texts()
    tokens = args.summary_tokens or (["<unk>"] if args.model in ("tiny", "small") else [])
    cfg = GEMConfig(p_raw=args.p_raw, train_mode="summary", summary_tokens=tokens, adapter_rank=args.adapter_rank)
    prepare_gem_lm(lm, tok, cfg, backend="auto", gradient_checkpointing=args.gradient_checkpointing)
    model = GEMModel(lm, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would make the deltas the base model: give them a value
        for d in model.adapter.deltas.values():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=generator) * 0.01)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    lm.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    loader = make_ntp_loader(
        InMemoryCorpus.from_texts(texts, tok),
        cfg,
        args.seq_length,
        micro_batch_size=args.micro_batch_size,
        tokenizer=tok,
        data_parallel_rank=0,
        data_parallel_size=1,
    )
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(loader)).items()}
    labels = batch["labels"].reshape(-1)
    targets = int((labels != IGNORE_INDEX).sum())
    summary_tokens = int(((batch["roles"] == Role.SPECIAL) & (batch["doc_ids"] != PAD_DOC_ID)).sum())
    if summary_tokens == 0:
        raise SystemExit(f"bench_summary_step: the batch holds no summary token (--p-raw {args.p_raw}); lower --p-raw or raise --seq-length")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(batch, "ntp")
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = statistics.median(times)
    return {
        "median_step_s": step,
        "min_step_s": min(times),
        "tokens_per_s": int((batch["doc_ids"] != PAD_DOC_ID).sum()) / step,
        "summary_tokens": summary_tokens,
        "adapted_layers": len(model.adapter.names),
        "peak_memory_mb": peak_mb,
        "loss": float(loss),
        "model": model_name,
        "corpus": corpus_name,
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "adapter_rank": args.adapter_rank,
        "steps": args.steps,
        "tree": REPO,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(
        f"summary-mode phase-1 step: {r['median_step_s']:.4f} s (median of {r['steps']}), {r['tokens_per_s']:.0f} tokens/s, "
        f"{r['summary_tokens']} summary tokens, {r['adapted_layers']} adapted layers, peak {r['peak_memory_mb']:.0f} MB",
        file=sys.stderr,
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
