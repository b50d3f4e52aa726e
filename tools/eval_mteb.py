#!/usr/bin/env python
"""MTEB evaluation of a GEM checkpoint, or of training-free baselines of any HF causal LM.

    python tools/eval_mteb.py --model runs/x/hf --method gem --tasks offline --output results/
    python tools/eval_mteb.py --model DIR --method mean --tasks Lee50DocSim SimLex999 --output r/
    python tools/eval_mteb.py --model DIR --method gem --tasks "MTEB(eng, v2)" --output r/   # needs the hub

--model may be a summary-mode adapter folder (--gem-train summary): --method gem loads the base
checkpoint named in its gem_config.json (or --base DIR; the weight digest must match) plus the
deltas; the baselines run on the base model.

--tasks takes offline suite names (see megatron_gem/eval/tasks.py), the word ``offline`` (the
whole suite), real MTEB task names (STSBenchmark, ...) and MTEB benchmark names; the last two
download their data, so they need the HF hub. Writes mteb's result files under
OUTPUT/results/<model>/<revision>/ and OUTPUT/summary.{md,json}. With --update-model-card the
main scores (mteb's 0-1 scale) and this command also go into the GEM export's eval_results.json
and the Evaluation section of its README.md (manifest verified before, updated after).
A model trained with --contrastive-query-prompt gets that prompt on mteb's queries.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (GEM export, HF causal LM, or sentence-transformers folder)")
    p.add_argument("--method", default="gem", choices=["gem", "mean", "last", "echo", "prompteol", "st"])
    p.add_argument("--tasks", nargs="+", default=["offline"], help="task/benchmark names, or 'offline'")
    p.add_argument("--output", required=True)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each offline task's items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--instructions", action="store_true", help="prepend mteb's task instruction to queries")
    p.add_argument("--name", default=None, help="model name in the results (org/name)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--update-model-card", action="store_true", help="record the scores in --model's README.md and eval_results.json (a GEM export)")
    p.add_argument("--base", default=None, help="summary-mode adapter folder: the base checkpoint directory (default: gem_config.json base_model)")
    return p.parse_args(argv)


def resolve_tasks(names: list[str], scale: float) -> list:
    """Offline suite tasks by name; everything else through mteb's registry."""
    from megatron_gem.eval.tasks import HELDOUT_TASKS, OFFLINE_TASKS, offline_tasks

    out, offline = [], []
    for n in names:
        if n == "offline":
            offline += [t for t in OFFLINE_TASKS if t not in offline]
        elif n in OFFLINE_TASKS + HELDOUT_TASKS:  # the held-out check runs by name, outside 'offline'
            offline.append(n)
        else:
            import mteb

            try:
                out += list(mteb.get_benchmark(n).tasks)
            except (KeyError, ValueError):
                try:
                    out.append(mteb.get_task(n))
                except KeyError as e:
                    raise SystemExit(f"eval_mteb: unknown task or benchmark {n!r}: neither in the offline suite ({', '.join(OFFLINE_TASKS)}) nor in mteb ({e})")
    return offline_tasks(offline, scale=scale) + out if offline else out


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_gem.common.errors import ModelLoadError
    from megatron_gem.eval.mteb_model import load_mteb_model, run_mteb, save_summary

    if args.update_model_card and not os.path.isfile(os.path.join(args.model, "gem_config.json")):
        raise SystemExit(f"eval_mteb: --update-model-card: --model {args.model} has no gem_config.json (not a GEM export directory)")
    tasks = resolve_tasks(args.tasks, args.scale)
    if not tasks:
        raise SystemExit("eval_mteb: no tasks")
    try:
        model = load_mteb_model(
            args.model,
            args.method,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
            max_length=args.max_length,
            instructions=args.instructions,
            show_progress_bar=not args.no_progress,
            name=args.name,
            base=args.base,
        )
    except ModelLoadError as e:  # a wrong folder or base: one clear line, not a traceback
        raise SystemExit(f"eval_mteb: {e}")
    scores = run_mteb(model, tasks, args.output, show_progress_bar=not args.no_progress, batch_size=args.batch_size)
    table = save_summary({model.mteb_model_meta.name: scores}, args.output)
    print(table)
    if args.update_model_card:
        import shlex

        from megatron_gem.hf.model_card import record_evaluation

        command = shlex.join(["tools/eval_mteb.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"model card: {record_evaluation(args.model, 'mteb', {t: {'main_score': v} for t, v in scores.items()}, command=command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
