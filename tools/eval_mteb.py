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
OUTPUT/results/<model>/<revision>/ and OUTPUT/summary.{md,json} (with a manifest.json): OUTPUT
must be new or empty, or --overwrite-output-dir replaces what an earlier run wrote there. With
--update-model-card the main scores (mteb's 0-1 scale) and this command also go into the GEM
export's eval_results.json and the Evaluation section of its README.md (manifest verified
before, updated after).
A model trained with --contrastive-query-prompt gets that prompt on mteb's queries. Errors are
one line on stderr (exit 2: a wrong argument or model folder, 1: a failure during the work);
--debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.outputs import add_overwrite_flag, check_apart, check_output_dir  # noqa: E402

PROG = "eval_mteb"
METHODS = ["gem", "mean", "last", "echo", "prompteol", "st"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (GEM export, HF causal LM, or sentence-transformers folder)")
    p.add_argument(
        "--method", default="gem", choices=METHODS, help="gem: GEMEmbedder; mean/last/echo/prompteol: baselines on any causal LM; st: sentence-transformers"
    )
    p.add_argument("--tasks", nargs="+", default=["offline"], help="task/benchmark names, or 'offline'")
    p.add_argument("--output", required=True, help="results directory (new or empty; see --overwrite-output-dir)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each offline task's items")
    p.add_argument("--batch-size", type=int, default=16, help="texts per encode call")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text, summary tokens included")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="model dtype (default: as saved, float32 for GEM)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--instructions", action="store_true", help="prepend mteb's task instruction to queries")
    p.add_argument("--name", default=None, help="model name in the results (org/name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--update-model-card", action="store_true", help="record the scores in --model's README.md and eval_results.json (a GEM export)")
    p.add_argument("--base", default=None, help="summary-mode adapter folder: the base checkpoint directory (default: gem_config.json base_model)")
    add_overwrite_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def resolve_tasks(names: list[str], scale: float) -> list:
    """Offline suite tasks by name; everything else through mteb's registry."""
    from megatron_gem.common.errors import InputError
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
                    raise InputError(
                        f"--tasks {n}: unknown task or benchmark {n!r}: neither in the offline suite ({', '.join(OFFLINE_TASKS)}) nor in mteb ({e})"
                    ) from None
    return offline_tasks(offline, scale=scale) + out if offline else out


def check_inputs(args) -> None:
    """Everything a wrong argument would spoil, before any model loads: the model folder (what
    the method needs), --base, --output, the numbers."""
    from megatron_gem.common.errors import InputError
    from megatron_gem.common.model_paths import ADAPTER_CONFIG, check_model_source

    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    if not 0 < args.scale <= 1:
        raise InputError(f"--scale {args.scale}: must lie in (0, 1]")
    if args.method == "st":
        check_model_source("--model", args.model, config=False, also=("modules.json", "config.json"))
    else:
        check_model_source("--model", args.model, config=True, tokenizer=True, also=(ADAPTER_CONFIG,))
    if args.method == "gem" and os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "gem_config.json")):
        raise InputError(f"--model {args.model}: no gem_config.json, so not a GEM checkpoint; --method mean/last/echo/prompteol evaluate a plain causal LM")
    if args.base is not None:
        check_model_source("--base", args.base, config=True, weights=True)
    if args.update_model_card and not os.path.isfile(os.path.join(args.model, "gem_config.json")):
        raise InputError(f"--update-model-card: --model {args.model} has no gem_config.json (not a GEM export directory)")
    if os.path.isdir(args.model):
        check_apart("--output", args.output, "--model", args.model)
    check_output_dir(args.output, "--output", overwrite=args.overwrite_output_dir)


def evaluate(args, argv) -> None:
    check_inputs(args)
    tasks = resolve_tasks(args.tasks, args.scale)
    if not tasks:
        from megatron_gem.common.errors import InputError

        raise InputError("--tasks: no tasks")
    from megatron_gem.common.manifest import write_manifest
    from megatron_gem.common.model_paths import loading
    from megatron_gem.common.outputs import building_dir, replace_dir_atomic
    from megatron_gem.eval.mteb_model import load_mteb_model, run_mteb, save_score_table

    with loading(f"--model {args.model}", args.model):
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
    # The results are built beside --output and swapped in when complete (common/outputs.py).
    with building_dir(args.output) as tmp:
        scores = run_mteb(model, tasks, tmp, show_progress_bar=not args.no_progress, batch_size=args.batch_size)
        table = save_score_table({model.mteb_model_meta.name: scores}, tmp)
        write_manifest(tmp)
    replace_dir_atomic(tmp, args.output, overwrite=args.overwrite_output_dir, flag="--output")
    print(table)
    if args.update_model_card:
        import shlex

        from megatron_gem.hf.model_card import record_evaluation

        command = shlex.join(["tools/eval_mteb.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"model card: {record_evaluation(args.model, 'mteb', {t: {'main_score': v} for t, v in scores.items()}, command=command)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(PROG, lambda: evaluate(args, argv), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
