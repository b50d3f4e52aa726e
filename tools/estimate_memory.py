#!/usr/bin/env python
"""Peak memory per rank of one training step, by part, without a GPU (the estimator of
megatron_gem/training/memory_estimate.py), and the bytes each rank communicates per step.

  tools/estimate_memory.py --recipes                    every recipe of training/recipes.py
  tools/estimate_memory.py --recipe llama3-8b-full-8k   one (repeatable)
  tools/estimate_memory.py --choose                     rerun the choice of the throughput layouts
  tools/estimate_memory.py --recipes --before-after     each recipe before / after the GPU-path changes
  tools/estimate_memory.py --model llama3-8b --zero-stage 3 --dp 8 --micro-batch-size 1 \\
      --seq-length 8192 --gradient-checkpointing        any layout of a known model

Prints markdown tables (GB = 10^9 bytes per rank): phase 1 (a micro-batch of packed next-token
rows), phase 2 (a contrastive micro-batch: the DeepSpeed engine's step, GradCache chunks, the
alpha-weighted NTP rows, a teacher; training/contrastive_memory.py), the peak of the run (the
larger of the two) and the communication; last, one JSON object of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.training import recipes as R  # noqa: E402
from megatron_gem.training.memory_estimate import PARTS, format_table  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=[], help="a recipe name (training/recipes.py RECIPES)")
    p.add_argument("--recipes", action="store_true", help="every recipe")
    p.add_argument("--choose", action="store_true", help="choose the throughput layouts again (minutes)")
    p.add_argument("--compare-communication", metavar="RECIPE", help="bytes per rank per step of RECIPE under ZeRO-1/2/3 and TP=8")
    p.add_argument("--megatron-config", action="append", default=[], help="a configs/megatron/*.json recipe (repeatable)")
    p.add_argument(
        "--before-after",
        action="store_true",
        help="the selected recipes estimated with the paths before the GPU-path changes (transformers' full-logits loss, the dense-mask "
        "attention) and after (the chunked LM-head loss, the Triton kernel)",
    )
    p.add_argument("--model", choices=sorted(R.MODELS), help="a model shape, for a layout of your own")
    p.add_argument("--mode", choices=("full", "summary"), default="full")
    p.add_argument("--engine", choices=("deepspeed", "megatron"), default="deepspeed")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: one micro-batch per data-parallel rank")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--gradient-checkpointing", action="store_true")
    g = p.add_argument_group("phase 2 (with --model; train.py's flags of the same names)")
    g.add_argument("--contrastive-batch-size", type=int, default=0, help="anchors per contrastive micro-batch (default 8 x --micro-batch-size)")
    g.add_argument("--contrastive-max-length", type=int, default=512)
    g.add_argument("--contrastive-micro-batch-size", type=int, default=0, help="GradCache chunk of anchors (default: none)")
    g.add_argument("--gem-alpha", type=float, default=1.0, help="< 1: (1 - alpha) NTP rides with the texts")
    g.add_argument("--teacher-params", type=int, default=0, help="a --contrastive-teacher's parameter count (fp32 on the GPU)")
    g.add_argument("--teacher-dim", type=int, default=1024, help="its embedding width (with --teacher-params)")
    args = p.parse_args(argv)
    if not 0.0 < args.gem_alpha <= 1.0:
        p.error(f"--gem-alpha {args.gem_alpha}: must lie in (0, 1]")
    unknown = [n for n in args.recipe if n not in R.RECIPES]
    if unknown:
        p.error(f"--recipe {unknown[0]}: unknown; known: {', '.join(R.RECIPES)}")
    if args.compare_communication and args.compare_communication not in R.RECIPES:
        p.error(f"--compare-communication {args.compare_communication}: unknown recipe; known: {', '.join(R.RECIPES)}")
    if not (args.recipe or args.recipes or args.choose or args.model or args.megatron_config or args.compare_communication):
        p.error("give --recipe NAME, --recipes, --choose, --megatron-config FILE, --compare-communication RECIPE or --model")
    for f in args.megatron_config:
        if not os.path.isfile(f):
            p.error(f"--megatron-config {f}: no such file")
    return args


def selected(args) -> list[R.Recipe]:
    if args.choose:
        out = []
        for model in R.MODELS:
            for mode in ("full", "summary"):
                base = R.Recipe(
                    name=f"{model}-{mode}-8k",
                    model=model,
                    train_mode=mode,
                    gpus=args.gpus,
                    micro_batch_size=1,
                    seq_length=args.seq_length,
                    global_batch_size=args.gpus,
                )
                out.append(R.choose(base)[0])
        return out
    if args.model:
        r = R.Recipe(
            name=f"{args.model}-{args.mode}",
            model=args.model,
            train_mode=args.mode,
            gpus=args.gpus,
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            global_batch_size=0,
            engine=args.engine,
            zero_stage=args.zero_stage,
            tp=args.tp,
            pp=args.pp,
            gradient_checkpointing=args.gradient_checkpointing,
            contrastive_batch_size=args.contrastive_batch_size,
            contrastive_max_length=args.contrastive_max_length,
            contrastive_micro_batch_size=args.contrastive_micro_batch_size,
            alpha=args.gem_alpha,
            teacher_params=args.teacher_params,
            teacher_dim=args.teacher_dim if args.teacher_params else 0,
        )
        return [replace(r, global_batch_size=args.global_batch_size or args.micro_batch_size * r.dp)]
    if args.megatron_config:
        return [R.from_megatron_json(f) for f in args.megatron_config]
    return list(R.RECIPES.values()) if args.recipes else [R.RECIPES[n] for n in args.recipe]


def layout_text(r: R.Recipe) -> str:
    par = f"ZeRO-{r.zero_stage}" if r.engine == "deepspeed" else f"TP={r.tp} PP={r.pp}"
    return f"{r.gpus} GPUs {par}, mb {r.micro_batch_size} x {r.seq_length}{', recompute' if r.gradient_checkpointing else ''}"


def compare_communication(name: str) -> dict:
    """The communication table of one recipe's model and batch under other layouts."""
    print("| layout | all-reduce GB | reduce-scatter GB | all-gather GB | sent per rank GB |")
    print("| --- | --- | --- | --- | --- |")
    figures = {}
    for label, r in R.layout_variants(R.RECIPES[name]):
        c = R.communication(r)
        figures[label] = {k: round(v / 1e9, 3) for k, v in c.items()}
        print(f"| {label} | {c['all_reduce'] / 1e9:.2f} | {c['reduce_scatter'] / 1e9:.2f} | {c['all_gather'] / 1e9:.2f} | {c['sent'] / 1e9:.2f} |")
    print(json.dumps({name: figures}))
    return figures


PATHS = (("after", "chunked", "triton"), ("before", "hf", "sdpa"))


def dense_scores_bytes(r: R.Recipe, rows: int) -> float:
    """fp32 scores [rows, heads on a rank, L, L] of the dense-mask path: what attention/dispatch.py's
    check_dense_fits weighs on CUDA (it refuses above DENSE_SCORE_FRACTION of the device)."""
    heads = R.MODELS[r.model]["num_attention_heads"] // r.tp
    return rows * heads * r.seq_length**2 * 4


def before_after(recipes: list[R.Recipe]) -> dict:
    """Peak GB per rank by part, before and after the GPU-path changes (docs/slurm.md)."""
    from megatron_gem.attention.dispatch import DENSE_SCORE_FRACTION
    from megatron_gem.training.contrastive_memory import contrastive_tokens

    guard = DENSE_SCORE_FRACTION * R.GPU_MEMORY_GB * 1e9
    print("| recipe | path | " + " | ".join(PARTS) + " | phase 1 GB | phase 2 GB | peak GB | dense fp32 scores GB (CUDA guard) |")
    print("|" + " --- |" * (len(PARTS) + 6))
    figures = {}
    for r in recipes:
        rows2 = contrastive_tokens(r.contrastive_shape(), seq_length=r.seq_length, train_mode=r.train_mode)[1] if r.engine == "deepspeed" else 0
        for label, loss, backend in PATHS:
            e = R.estimate(r, loss=loss, backend=backend)
            e2 = R.estimate_phase2(r, backend=backend)
            peak = max(e.peak, e2.peak) if e2 is not None else e.peak
            g = e.gb()
            scores = ""
            if label == "before":
                worst = dense_scores_bytes(r, max(r.micro_batch_size, rows2))
                scores = f"{worst / 1e9:.1f} ({'refused' if worst > guard else 'runs'})"
            p2 = f"{e2.peak / 1e9:.2f}" if e2 is not None else "not modelled"
            print(f"| {r.name} | {label} | " + " | ".join(f"{g[k]:.2f}" for k in PARTS) + f" | {e.peak / 1e9:.2f} | {p2} | {peak / 1e9:.2f} | {scores} |")
            figures.setdefault(r.name, {})[label] = {
                "phase1_gb": g,
                "phase2_gb": e2.gb() if e2 is not None else None,
                "peak_gb": round(peak / 1e9, 3),
                **({"dense_scores_gb": round(worst / 1e9, 3), "refused_on_cuda": worst > guard} if label == "before" else {}),
            }
    print(json.dumps(figures))
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_communication:
        return compare_communication(args.compare_communication)
    if args.before_after:
        return before_after(selected(args))
    rows, rows2, peak_lines, figures, comm_lines = [], [], [], {}, []
    for r in selected(args):
        e = R.estimate(r)
        e2 = R.estimate_phase2(r)
        c = R.communication(r)
        rows.append((f"{r.name} ({layout_text(r)})", e))
        peak = max(e.peak, e2.peak) if e2 is not None else e.peak
        if e2 is not None:
            rows2.append((f"{r.name} ({r.contrastive_shape().describe()})", e2))
        fits = peak <= (R.GPU_MEMORY_GB - R.HEADROOM_GB) * 1e9
        phase2_text = f"{e2.peak / 1e9:.2f}" if e2 is not None else "not modelled"
        peak_lines.append(f"| {r.name} | {e.peak / 1e9:.2f} | {phase2_text} | {peak / 1e9:.2f} | {'yes' if fits else 'no'} |")
        figures[r.name] = {
            "recipe": asdict(r),
            "memory_gb": e.gb(),
            "phase2_memory_gb": e2.gb() if e2 is not None else None,
            "peak_gb": round(peak / 1e9, 3),
            "fits": fits,
            "tokens_per_gpu_per_step": r.tokens_per_gpu,
            "communication_gb_per_rank_per_step": {k: round(v / 1e9, 3) for k, v in c.items()},
        }
        comm_lines.append(
            f"| {r.name} | {r.tokens_per_gpu:,} | {c['reduce_scatter'] / 1e9:.2f} | {c['all_gather'] / 1e9:.2f} | {c['all_reduce'] / 1e9:.2f} | {c['sent'] / 1e9:.2f} |"
        )
    print(format_table(rows))
    print()
    if rows2:
        print("Phase 2 (contrastive micro-batch):")
        print()
        print(format_table(rows2))
        print()
    print(f"| recipe | phase 1 GB | phase 2 GB | peak GB | fits {R.GPU_MEMORY_GB - R.HEADROOM_GB:.0f} GB |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(peak_lines))
    print()
    print("| recipe | tokens per GPU per step | reduce-scatter GB | all-gather GB | all-reduce GB | sent per rank GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(comm_lines))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
