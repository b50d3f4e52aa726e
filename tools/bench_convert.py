#!/usr/bin/env python
"""Benchmark of tools/convert_checkpoint.py at the real size: a random HF checkpoint with the
exact Llama-3-8B shapes (bf16, ~16 GB, 5 GB shards like the published one) converted to a
megatron-core dist checkpoint for TP=4 x PP=2 and back to HF.

Reports, for each direction, the wall time against copying the same bytes on the same disk
(target: <= 2x; the copy is timed before and after the conversions and averaged), the
converter's peak RSS (target: <= 4 GB; each conversion runs in its own
process, measured with wait4), and whether the round trip is bit-exact (every tensor, and the
config). Figures in the JSON are unrounded (a tiny copy can take
under 5 ms; rounding it would report 0). Needs ~50 GB free in --workdir (input, one copy or converted checkpoint, output); the
copy is deleted before converting. Last line: one JSON object.

    python tools/bench_convert.py                          # Llama-3-8B shapes, ~16 GB
    python tools/bench_convert.py --shape tiny --keep      # seconds; checks the tool itself
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=512,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


def log(msg: str) -> None:
    print(f"[bench_convert {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hf_tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the HF Llama model of ``cfg`` (built on the meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def write_random_checkpoint(directory: str, shape: str, seed: int) -> int:
    """An HF Llama checkpoint with random bf16 weights, written tensor by tensor; returns bytes."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig

    from megatron_gem.mcore.checkpoint_io import finish_hf_dir
    from megatron_gem.mcore.lazy_checkpoint_io import SafetensorsShardWriter

    cfg = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    shapes = hf_tensor_shapes(cfg)
    shards = SafetensorsShardWriter(tmp, [(n, shp, torch.bfloat16) for n, shp in shapes], 5 * 10**9)
    for name, shp in tqdm(shapes, desc="random checkpoint", unit="tensor", mininterval=5.0):
        t = torch.empty(shp, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.uniform_(0.5, 1.5, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shards.add(name, t)
    weight_map, total = shards.close()
    finish_hf_dir(tmp, directory, config=cfg.to_dict(), weight_map=weight_map, total_size=total)
    return total


def dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def timed_copy(src: str, dst: str) -> float:
    """Copy every file of src (same bytes the converter reads and writes), fsync'd like the
    converter's output is by its final rename; returns seconds."""
    t0 = time.perf_counter()
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dst, name), "wb") as fo:
            shutil.copyfileobj(fi, fo, length=16 << 20)
            fo.flush()
            os.fsync(fo.fileno())
    return time.perf_counter() - t0


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS in GB of that process)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_convert: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def round_trip_equal(a_dir: str, b_dir: str) -> tuple[bool, int, list[str]]:
    """Tensor-by-tensor comparison of two HF checkpoints; (equal, tensors compared, mismatches)."""
    import torch

    from megatron_gem.mcore.hf_mapping import HFWeights

    a, b = HFWeights(a_dir), HFWeights(b_dir)
    bad = sorted(set(a.where) ^ set(b.where))
    for name in sorted(set(a.where) & set(b.where)):
        x, y = a(name), b(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            bad.append(name)
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (a_dir, b_dir))
    for k in sorted(set(ca) | set(cb)):
        if k != "transformers_version" and ca.get(k) != cb.get(k):
            bad.append(f"config.json:{k}")
    return not bad, len(a.where), bad


def _reusable(src: str, shape: str) -> bool:
    """A finished random checkpoint of this shape from an earlier (e.g. interrupted) run."""
    try:
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    dims = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return all(cfg.get(k) == SHAPES[shape][k] for k in dims)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_gem", "bench_convert"))
    p.add_argument("--tensor-model-parallel-size", type=int, default=4)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them at the end)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = os.path.join(args.workdir, args.shape)
    src, copy, mg, back = (os.path.join(work, n) for n in ("hf", "hf_copy", "megatron", "hf_back"))
    for d in (copy, mg, back):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    if not _reusable(src, args.shape):
        shutil.rmtree(src, ignore_errors=True)
        from transformers import LlamaConfig

        need = 3 * 2 * sum(math.prod(shp) for _, shp in hf_tensor_shapes(LlamaConfig(**SHAPES[args.shape])))  # bf16: input, megatron, output
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"bench_convert: {work} has {free / 1e9:.0f} GB free; the benchmark needs about {need / 1e9:.0f} GB")
        log(f"writing a random {args.shape} checkpoint to {src}")
        t0 = time.perf_counter()
        write_random_checkpoint(src, args.shape, args.seed)
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    size = dir_bytes(src)
    log(f"checkpoint: {size / 1e9:.2f} GB in {len(os.listdir(src))} files")

    def copy_baseline() -> float:
        log("copy of the same bytes (baseline)")
        seconds = timed_copy(src, copy)
        shutil.rmtree(copy)
        log(f"  {seconds:.1f} s ({size / 1e9 / seconds:.2f} GB/s)")
        return seconds

    # The disk's speed drifts (page cache, other jobs): the baseline is the mean of a copy
    # before and one after the conversions.
    copies = [copy_baseline()]

    tool = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py")]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    log(f"hf-to-megatron (TP={tp}, PP={pp})")
    to_mg_s, to_mg_rss = run_measured(
        tool + ["hf-to-megatron", "--input", src, "--output", mg, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    )
    log(f"  {to_mg_s:.1f} s, peak RSS {to_mg_rss:.2f} GB")
    log("megatron-to-hf")
    to_hf_s, to_hf_rss = run_measured(tool + ["megatron-to-hf", "--input", mg, "--output", back])
    log(f"  {to_hf_s:.1f} s, peak RSS {to_hf_rss:.2f} GB")
    log("comparing the round trip tensor by tensor")
    equal, n, bad = round_trip_equal(src, back)
    log(f"  {'bit-exact' if equal else 'MISMATCH: ' + ', '.join(bad[:10])} ({n} tensors)")
    mg_bytes = dir_bytes(mg)
    shutil.rmtree(back)
    copies.append(copy_baseline())
    copy_s = sum(copies) / len(copies)

    result = {
        "shape": args.shape,
        "tp": tp,
        "pp": pp,
        "checkpoint_gb": size / 1e9,
        "megatron_checkpoint_gb": mg_bytes / 1e9,
        "copy_s": copy_s,
        "copy_runs_s": list(copies),
        "hf_to_megatron_s": to_mg_s,
        "megatron_to_hf_s": to_hf_s,
        "hf_to_megatron_vs_copy": to_mg_s / copy_s,
        "megatron_to_hf_vs_copy": to_hf_s / copy_s,
        "hf_to_megatron_peak_rss_gb": to_mg_rss,
        "megatron_to_hf_peak_rss_gb": to_hf_rss,
        "bit_exact": equal,
        "tensors": n,
        "mismatches": bad[:20],
        "targets": {"vs_copy_max": 2.0, "peak_rss_gb_max": 4.0},
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
