#!/usr/bin/env python
"""Generation-side evaluation with the lm-eval harness, on an HF checkpoint (a GEM export is one).

    python tools/eval_lm.py --model runs/x/hf --output results/lm
    python tools/eval_lm.py --model runs/x/hf --tasks gem_trivia_mc perplexity --max-items 200 --output r/
    python tools/eval_lm.py --model runs/x/hf --tasks mmlu --output r/        # needs the HF hub

A summary-mode adapter folder (--gem-train summary) evaluates its base model: the deltas act
only at the summary tokens, which generation never feeds, so the base model IS the generation
model (its weight digest is checked against gem_config.json; --base overrides its base_model).

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


def parse_args(argv=None):
    from megatron_gem.eval.lm import DEFAULT_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (or hub name when online)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--output", required=True)
    p.add_argument("--max-items", type=int, default=500, help="questions per offline MC task")
    p.add_argument("--limit", type=float, default=None, help="lm-eval --limit (per task)")
    p.add_argument("--ppl-texts", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update-model-card", action="store_true", help="record the figures in --model's README.md and eval_results.json (a GEM export)")
    p.add_argument("--base", default=None, help="summary-mode adapter folder: the base checkpoint directory (default: gem_config.json base_model)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_gem.eval.lm import results_table, run_lm_eval

    if args.update_model_card and not os.path.isfile(os.path.join(args.model, "gem_config.json")):
        print(f"eval_lm: --update-model-card: --model {args.model} has no gem_config.json (not a GEM export directory)", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    try:
        res = run_lm_eval(
            args.model,
            tasks=args.tasks,
            work_dir=args.output,
            max_items=args.max_items,
            limit=limit,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            perplexity_texts=args.ppl_texts,
            base=args.base,
        )
    except (RuntimeError, ValueError) as e:
        print(f"eval_lm: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.output, "lm_results.json"), "w") as f:
        json.dump({"model": args.model, "results": res}, f, indent=2)
    print(results_table({args.model: res}))
    if args.update_model_card:
        import shlex

        from megatron_gem.hf.model_card import record_evaluation

        command = shlex.join(["tools/eval_lm.py", *(sys.argv[1:] if argv is None else argv)])
        scores = {t: {m: v for m, v in r.items() if isinstance(v, (int, float))} for t, r in res.items()}
        print(f"model card: {record_evaluation(args.model, 'lm', scores, command=command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
