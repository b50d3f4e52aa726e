"""The GPU check's command line and orchestration: each part in its own subprocess with its share
of the time budget (unused time passes on), the record rewritten after every part, the last
stdout line one JSON object of the figures. ``python tools/gpu_check.py`` runs ``main``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import torch

from .common import PEAK_BF16_TFLOPS, REPO, Clock, error_text, log, set_log_file, write_json
from .correctness import part_a
from .environment import environment, gemm_tflops
from .report import evaluate_targets, headline, markdown
from .speed import part_b
from .train_e2e import COMBOS, WHEELS_ENV, part_e
from .train_step import part_d
from .tuning import part_c

USAGE = "GPU check of the GEM attention kernel and of train.py: correctness, speed, tuning, a training step, train.py end to end."
ENTRY = os.path.join(REPO, "tools", "gpu_check.py")  # what each part's subprocess runs
PARTS = ("a", "b", "c", "d", "e")
DEFAULT_PARTS = "a,b,c,d"  # e (about 5 minutes on a GPU) runs when asked: --parts e
PART_FUNCTIONS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}
# Share of the time budget per part; a part's unused time passes to the parts after it.
SHARES = {"a": 0.15, "b": 0.40, "c": 0.27, "d": 0.18, "e": 1.0}
DEFAULT_BUDGET_S = 300.0
QUICK_BUDGET_S = 240.0


def run_part_inprocess(part: str, args, budget_s: float) -> dict:
    """Run one part here; its results go to part_X.json as they come."""
    cuda = torch.cuda.is_available() and not args.cpu
    ctx = {
        "cuda": cuda,
        "device": "cuda" if cuda else "cpu",
        "quick": args.quick,
        "train_rows": args.train_rows,
        "wheels": args.wheels,
        "train_combos": args.train_combos,
    }
    res = {"part": part, "status": "running", "budget_s": budget_s}
    path = os.path.join(args.output, f"part_{part}.json")
    clock = Clock(budget_s)

    def save():
        res["seconds"] = clock.elapsed()
        write_json(path, res)

    fn = PART_FUNCTIONS[part]
    save()
    if os.environ.get("GPU_CHECK_CRASH_PART") == part:  # test seam: a part dying outright
        os._exit(3)
    try:
        fn(ctx, clock, res, save)
        res["status"] = "ok"
    except BaseException as e:  # noqa: BLE001  (SystemExit from SIGTERM too: record and save)
        res.update(status="failed", error=error_text(e), traceback=traceback.format_exc()[-4000:])
        log(traceback.format_exc())
    save()
    return res


def _prepare_env(args) -> bool:
    cuda = torch.cuda.is_available() and not args.cpu
    # Must precede the first import of the kernel module: triton.jit reads it at decoration time.
    os.environ["TRITON_INTERPRET"] = "0" if cuda else "1"
    return cuda


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=USAGE)
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated subset of {','.join(PARTS)} (default {DEFAULT_PARTS})")
    ap.add_argument("--output", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out"))
    ap.add_argument(
        "--time-budget-s", type=float, default=None, help=f"wall-clock budget of all parts (default {DEFAULT_BUDGET_S:.0f}, quick {QUICK_BUDGET_S:.0f})"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU testing)")
    ap.add_argument("--cpu", action="store_true", help="ignore CUDA even if present (the interpreter path)")
    ap.add_argument("--no-isolate", action="store_true", help="run the parts in this process instead of one subprocess each")
    ap.add_argument("--train-rows", type=int, default=4, help="rows of 4096 tokens per training step (part d)")
    ap.add_argument("--wheels", default=None, help=f"folder of deepspeed / megatron-core wheels for part e (default ${WHEELS_ENV}, else gpu_wheels/)")
    ap.add_argument("--train-combos", default=",".join(COMBOS), help=f"part e's engine:mode runs (default {','.join(COMBOS)})")
    ap.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    log_file = os.path.join(args.output, "gpu_check.log")
    set_log_file(log_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still saves what is there
    cuda = _prepare_env(args)

    if args._part:  # child: one part
        run_part_inprocess(args._part, args, args._budget)
        return 0

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")
    budget = args.time_budget_s or (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    if os.path.exists(log_file):
        os.remove(log_file)
    t_start = time.monotonic()
    result = {
        "tool": "tools/gpu_check.py",
        "command": " ".join([os.path.basename(sys.executable), "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "time_budget_s": budget,
        "parts_asked": parts,
        "env": environment(cuda),
        "parts": {},
        "files": {"json": os.path.join(args.output, "gpu_check.json"), "markdown": os.path.join(args.output, "gpu_check.md")},
        "peak_bf16_tflops_for_mfu": PEAK_BF16_TFLOPS,
    }

    def save():
        result["wall_s"] = time.monotonic() - t_start
        result["targets"] = evaluate_targets(result)
        write_json(result["files"]["json"], result)
        with open(result["files"]["markdown"], "w") as f:
            f.write(markdown(result))

    log(f"gpu_check: {result['env'].get('gpu') or 'CPU (interpreter)'}; parts {parts}; budget {budget:.0f} s; output {args.output}")
    try:
        result["gemm"] = gemm_tflops(cuda)
    except Exception as e:  # noqa: BLE001
        result["gemm"] = {"error": error_text(e)}
    save()
    try:
        for i, p in enumerate(parts):
            left = budget - (time.monotonic() - t_start)
            share = SHARES[p] / sum(SHARES[q] for q in parts[i:])
            part_budget = max(5.0, left * share)
            log(f"part {p}: budget {part_budget:.0f} s")
            t0 = time.monotonic()
            path = os.path.join(args.output, f"part_{p}.json")
            if os.path.exists(path):
                os.remove(path)
            if args.no_isolate:
                res = run_part_inprocess(p, args, part_budget)
            else:
                cmd = (
                    [
                        sys.executable,
                        ENTRY,
                        "--_part",
                        p,
                        "--_budget",
                        str(part_budget),
                        "--output",
                        args.output,
                        "--train-rows",
                        str(args.train_rows),
                        "--train-combos",
                        args.train_combos,
                    ]
                    + (["--wheels", args.wheels] if args.wheels else [])
                    + (["--quick"] if args.quick else [])
                    + (["--cpu"] if args.cpu else [])
                )
                # Hard stop well past the part's own budget (a measurement can overrun it).
                hard = part_budget * 1.5 + 90
                try:
                    proc = subprocess.run(cmd, timeout=hard)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    rc = "killed after %.0f s" % hard
                res = None
                if os.path.exists(path):
                    with open(path) as f:
                        res = json.load(f)
                if res is None:
                    res = {"status": "failed", "error": f"the part's process ended ({rc}) before writing any result"}
                elif res.get("status") == "running":
                    res.update(status="failed", error=f"the part's process ended ({rc}) mid-part; the figures it had written are kept")
                if rc != 0:
                    res["process_exit"] = rc
            res["seconds"] = time.monotonic() - t0
            res["budget_s"] = part_budget
            result["parts"][p] = res
            save()
    finally:
        result["wall_s"] = time.monotonic() - t_start
        save()
        s = headline(result)
        for rec in s.get("tuning", []):
            print(rec)
        print(json.dumps(s, default=str))
    return 0
