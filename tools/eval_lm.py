#!/usr/bin/env python
"""Generation-side evaluation with the lm-eval harness, on an HF checkpoint (a GEM export is one).

    python tools/eval_lm.py --model runs/x/hf --output results/lm
    python tools/eval_lm.py --model runs/x/hf --tasks gem_trivia_mc perplexity --max-items 200 --output r/
    python tools/eval_lm.py --model runs/x/hf --tasks mmlu --output r/        # needs the HF hub

A summary-mode adapter folder (--gem-train summary) evaluates its base model: the deltas act
only at the summary tokens, which generation never feeds, so the base model IS the generation
model (its weight digest is checked against gem_config.json; --base overrides its base_model).

--output must be new or empty (--overwrite-output-dir replaces what an earlier run wrote there);
errors are one line on stderr (exit 2: the input, 1: the work), --debug shows the traceback.
Default tasks: the offline multiple-choice tasks (gem_trivia_mc, gem_wordnet_def_mc; data built
at run time from installed packages) and held-out perplexity. Any lm-eval task name is
accepted (mmlu, hellaswag, ...) when its data is reachable. Writes OUTPUT/lm_results.json and
prints a table; --update-model-card also records the figures and this command in the GEM
export's eval_results.json and README.md (manifest verified before, updated after). From Python, megatron_gem.eval.lm.run_lm_eval(model, tokenizer, ...) takes a
live model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.outputs import add_overwrite_flag, check_apart, check_output_dir  # noqa: E402

PROG = "eval_lm"


def parse_args(argv=None):
    from megatron_gem.eval.lm import DEFAULT_TASKS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (or hub name when online)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="lm-eval task names (default: the offline MC tasks and perplexity)")
    p.add_argument("--output", required=True, help="results directory (new or empty; see --overwrite-output-dir)")
    p.add_argument("--max-items", type=int, default=500, help="questions per offline MC task")
    p.add_argument("--limit", type=float, default=None, help="lm-eval --limit (per task)")
    p.add_argument("--ppl-texts", type=int, default=200, help="held-out texts of the perplexity task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="model dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the offline tasks' item sampling")
    p.add_argument("--update-model-card", action="store_true", help="record the figures in --model's README.md and eval_results.json (a GEM export)")
    p.add_argument("--base", default=None, help="summary-mode adapter folder: the base checkpoint directory (default: gem_config.json base_model)")
    add_overwrite_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def evaluate(args, argv) -> None:
    from megatron_gem.common.errors import InputError
    from megatron_gem.common.manifest import write_manifest
    from megatron_gem.common.model_paths import ADAPTER_CONFIG, check_model_source, loading
    from megatron_gem.common.outputs import building_dir, replace_dir_atomic
    from megatron_gem.eval.lm import results_table, run_lm_eval

    check_model_source("--model", args.model, config=True, tokenizer=True, also=(ADAPTER_CONFIG,))
    if args.base is not None:
        check_model_source("--base", args.base, config=True, weights=True)
    if args.update_model_card and not os.path.isfile(os.path.join(args.model, "gem_config.json")):
        raise InputError(f"--update-model-card: --model {args.model} has no gem_config.json (not a GEM export directory)")
    if os.path.isdir(args.model):
        check_apart("--output", args.output, "--model", args.model)
    check_output_dir(args.output, "--output", overwrite=args.overwrite_output_dir)
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    with building_dir(args.output) as tmp:
        with loading(f"--model {args.model}", args.model):
            res = run_lm_eval(
                args.model,
                tasks=args.tasks,
                work_dir=tmp,
                max_items=args.max_items,
                limit=limit,
                batch_size=args.batch_size,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
                perplexity_texts=args.ppl_texts,
                base=args.base,
            )
        with open(os.path.join(tmp, "lm_results.json"), "w") as f:
            json.dump({"model": args.model, "results": res}, f, indent=2)
        write_manifest(tmp)
    replace_dir_atomic(tmp, args.output, overwrite=args.overwrite_output_dir, flag="--output")
    print(results_table({args.model: res}))
    if args.update_model_card:
        import shlex

        from megatron_gem.hf.model_card import record_evaluation

        command = shlex.join(["tools/eval_lm.py", *(sys.argv[1:] if argv is None else argv)])
        scores = {t: {m: v for m, v in r.items() if isinstance(v, (int, float))} for t, r in res.items()}
        print(f"model card: {record_evaluation(args.model, 'lm', scores, command=command)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # lm-eval and transformers report a bad task or model argument as ValueError.
    return run_main(PROG, lambda: evaluate(args, argv), debug=args.debug, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
