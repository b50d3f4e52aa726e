#!/usr/bin/env python
"""Phase-2 step time on the megatron-core engine: summary mode's fast path vs its full rows vs
full mode, through train.py (what users launch), same model, data, batch and seed.

Modes (each one train.py run under torchrun, the megatron-core engine; every step is phase 2:
``--gem-contrastive-from-step 0``, InfoNCE only, ``--gem-alpha 1``):
  summary_fast      --gem-train summary: a forward-only prefill pass recording each layer's keys
                    and values, then forward + backward of the summary tokens only
  summary_full_row  --gem-train summary --no-gem-summary-fast-path: the full rows with autograd
                    (the fast path's reference): what the fast path itself saves
  full              --gem-train full: every weight trains (the paper)
Reports the median ``step_time_s`` of metrics.jsonl over the steps after ``--warmup`` (forward,
backward and optimizer step of one global batch; the same clock train.py logs), and the ratios
summary_fast / full (target <= 0.5) and summary_fast / summary_full_row. Peak memory of the
phase-2 step is measured by tools/bench_train.py (HF engine). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODES = ("summary_fast", "summary_full_row", "full")
MODE_FLAGS = {
    "summary_fast": ["--gem-train", "summary"],
    "summary_full_row": ["--gem-train", "summary", "--no-gem-summary-fast-path"],
    "full": ["--gem-train", "full"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="small", help="'small' (random Llama: 8 layers, hidden 512, GQA 8/4), 'tiny' (2 layers, hidden 64), or an HF checkpoint dir"
    )
    p.add_argument(
        "--summary-tokens",
        nargs="+",
        default=None,
        metavar="TOKEN",
        help="--gem-summary-tokens (default: '<unk>' for small/tiny, train.py's default otherwise)",
    )
    p.add_argument("--contrastive-batch-size", type=int, default=16)
    p.add_argument("--contrastive-max-length", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc-per-node)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory, removed after)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "nproc", "contrastive_batch_size", "contrastive_max_length", "seq_length"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return args


def write_inputs(args, work: str) -> tuple[str, str, list[str]]:
    """(model dir, corpus jsonl, summary-token flags); the models and the text are bench_train.py's."""
    from bench_train import corpus_texts, load  # tools/ is the script's directory

    model = args.model
    tokens = args.summary_tokens
    if model in ("small", "tiny"):
        lm, tok, _ = load(argparse.Namespace(model=model))
        model = os.path.join(work, "model")
        lm.save_pretrained(model, safe_serialization=True)
        tok.save_pretrained(model)
        tokens = tokens or ["<unk>"]
    elif not os.path.isdir(model):
        raise SystemExit(f"bench_megatron_phase2: --model {model}: not 'small', 'tiny' or a checkpoint directory")
    texts, _ = corpus_texts()
    data = os.path.join(work, "corpus.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return model, data, (["--gem-summary-tokens", *tokens] if tokens else [])


def train_command(args, mode: str, model: str, data: str, tokens: list[str], save: str) -> list[str]:
    dp = args.nproc // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", f"--master-port={_free_port()}", os.path.join(REPO, "train.py")]
    cmd += ["--model", model, "--data", data, "--save", save, "--seq-length", str(args.seq_length)]
    cmd += ["--micro-batch-size", "1", "--global-batch-size", str(max(dp, 1)), "--train-iters", str(args.warmup + args.steps)]
    cmd += ["--gem-contrastive-from-step", "0", "--gem-alpha", "1.0", "--contrastive-batch-size", str(args.contrastive_batch_size)]
    cmd += ["--contrastive-max-length", str(args.contrastive_max_length), "--gem-adapter-rank", str(args.adapter_rank)]
    cmd += ["--tensor-model-parallel-size", str(args.tensor_model_parallel_size), "--pipeline-model-parallel-size", str(args.pipeline_model_parallel_size)]
    cmd += ["--log-interval", "1", "--save-interval", str(10**9), "--no-progress", "--attention-backend", "auto", "--seed", "0"]
    return cmd + MODE_FLAGS[mode] + (tokens if mode.startswith("summary") else [])


def _free_port() -> int:
    from megatron_gem.common.distributed import free_port

    return free_port()


def run(args, mode: str, model: str, data: str, tokens: list[str], work: str) -> dict:
    save = os.path.join(work, mode)
    cmd = train_command(args, mode, model, data, tokens, save)
    print(f"[{mode}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench_megatron_phase2: {mode}: train.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"step_time_s"' in line]
    timed = [r["step_time_s"] for r in records if r["step"] > args.warmup]
    if not timed or any(r["phase"] != 2 for r in records):
        raise SystemExit(f"bench_megatron_phase2: {mode}: expected {args.steps} phase-2 steps after warm-up in {save}/metrics.jsonl")
    path_line = next((line for line in proc.stdout.splitlines() if "phase 2:" in line), "")
    out = {"median_step_s": statistics.median(timed), "steps": timed, "cl_loss_last": records[-1]["cl_loss"]}
    if mode.startswith("summary"):
        out["phase2_path"] = path_line[path_line.index("phase 2:") :].split(")")[0] + ")" if path_line else None
    print(f"[{mode}] median step {out['median_step_s']:.3f} s over {len(timed)} steps", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_megatron_phase2_")
    os.makedirs(work, exist_ok=True)
    try:
        model, data, tokens = write_inputs(args, work)
        results = {m: run(args, m, model, data, tokens, work) for m in args.modes}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratios = {}
    for a, b in (("summary_fast", "full"), ("summary_fast", "summary_full_row"), ("summary_full_row", "full")):
        if a in results and b in results:
            ratios[f"{a}/{b}"] = results[a]["median_step_s"] / results[b]["median_step_s"]
    if "summary_fast/full" in ratios:
        print(f"summary fast path / full mode: {ratios['summary_fast/full']:.2f} (target <= 0.5: {'met' if ratios['summary_fast/full'] <= 0.5 else 'missed'})")
    setup = {
        k: getattr(args, k) for k in ("model", "contrastive_batch_size", "contrastive_max_length", "seq_length", "adapter_rank", "steps", "warmup", "nproc")
    }
    setup |= {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size}
    print(json.dumps({"setup": setup, "modes": results, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
