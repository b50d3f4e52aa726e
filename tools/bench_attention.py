#!/usr/bin/env python
"""Benchmark GEM attention on realistic packed sequences.

    python tools/bench_attention.py [--seq 4096 8192 32768] [--batch 2] [--heads 8 --kv-heads 2 --head-dim 64]

Rows are packed with documents whose lengths are drawn from a real corpus (paragraphs of the
Python 3.11 reST documentation in /usr/share/doc/python3.11, Debian package python3.11-doc;
tokens estimated as UTF-8 bytes / 4), each laid out with megatron_gem.gem.layout.draw_layout
(K=1 special token, p_raw=0.8, split). Without that corpus the lengths come from a lognormal
(documented in the output as "synthetic"). For each sequence length it reports
  * tiles visited by the block-sparse kernel vs the tiles of dense causal attention,
  * FLOPs the kernel executes (visited tiles x tile FLOPs) vs the exact allowed-pair FLOPs,
  * block-table build time and memory vs a dense boolean [B, L, L] mask,
  * CUDA: TFLOP/s of the Triton kernel and FlexAttention on the GEM mask, and of
    FlashAttention-2 causal (if installed) on the same shapes;
  * CPU: time of the sdpa path (dense mask) at lengths up to --cpu-max-len; the others are
    skipped with the reason.
  * peak memory (--memory-seq, default 8k 16k 32k; --memory-seq with no value skips it) of one
    forward of compiled FlexAttention and of the dense-mask reference, each in its own
    subprocess so peaks do not mix: the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs after the warm-up call that compiles flex) above its RSS just before
    the call, and the resident set of each. The call includes what a batch derives once (the
    BlockMask, the dense mask). On CUDA the same figure is torch.cuda.max_memory_allocated
    above the allocation before the call. FlexAttention has no backward on CPU in this torch,
    so its backward's memory is left to a GPU (tools/gpu_check.py).
Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_gem.gem.config import GEMConfig  # noqa: E402
from megatron_gem.gem.layout import build_layout, draw_layout  # noqa: E402
from megatron_gem.gem.roles import PAD_DOC_ID  # noqa: E402
from megatron_gem.kernels.block_table import allowed_pair_count, build_block_table  # noqa: E402

CORPUS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
BYTES_PER_TOKEN = 4  # the usual estimate for English BPE vocabularies (GPT-2/Llama: ~4 bytes)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def corpus_lengths(max_tokens: int) -> tuple[np.ndarray, str]:
    """Document lengths in (estimated) tokens, and a description of where they came from."""
    files = sorted(glob.glob(CORPUS_GLOB, recursive=True))
    lengths = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for para in f.read().split("\n\n"):
                para = para.strip()
                if len(para) >= 20:
                    lengths.append(min(max_tokens, math.ceil(len(para.encode()) / BYTES_PER_TOKEN)))
    if lengths:
        return np.array(lengths), f"python3.11-doc reST paragraphs ({len(files)} files, {len(lengths)} paragraphs, tokens ~ bytes/{BYTES_PER_TOKEN})"
    rng = np.random.default_rng(0)
    synth = np.clip(np.round(rng.lognormal(mean=4.0, sigma=1.0, size=20000)), 2, max_tokens).astype(int)
    return synth, "synthetic lognormal(mu=4, sigma=1) lengths: no corpus found at " + CORPUS_GLOB


def pack_rows(lengths: np.ndarray, B: int, L: int, config: GEMConfig, seed: int):
    """doc_ids, roles [B, L] (int64): documents drawn from ``lengths``, laid out by draw_layout."""
    rng = np.random.default_rng(seed)
    K = config.num_special_tokens
    doc = np.full((B, L), PAD_DOC_ID, dtype=np.int64)
    role = np.zeros((B, L), dtype=np.int64)
    n_docs = n_gem = 0
    for b in range(B):
        pos, d = 0, 0
        while pos < L:
            n = int(rng.choice(lengths))
            layout, cut = draw_layout(n, config, rng)
            if layout != "plain" and n + K > L - pos:
                layout, cut = "plain", None
            n = min(n, L - pos)
            _, r = build_layout(np.zeros(n, dtype=np.int64), layout, list(range(K)), cut=cut)
            doc[b, pos : pos + len(r)] = d
            role[b, pos : pos + len(r)] = r
            pos += len(r)
            d += 1
            n_docs += 1
            n_gem += layout != "plain"
    return torch.from_numpy(doc), torch.from_numpy(role), n_docs, n_gem


def median_time(fn, reps: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cuda_figures(doc, role, args, exact_flops, causal_flops):
    """TFLOP/s of triton and flex on the GEM mask, and FA2 causal, forward and forward+backward."""
    from triton.testing import do_bench

    from megatron_gem.attention.dispatch import flex_gem_attention
    from megatron_gem.kernels import triton_gem_attention

    B, L = doc.shape
    dt = torch.bfloat16
    q = torch.randn(B, args.heads, L, args.head_dim, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, args.kv_heads, L, args.head_dim, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    do = torch.randn_like(q)
    doc, role = doc.cuda(), role.cuda()
    out = {}

    def bench(name, fwd, flops):
        ms_f = do_bench(lambda: fwd())
        ms_fb = do_bench(lambda: fwd().backward(do, retain_graph=False))
        out[name] = {"fwd_ms": ms_f, "fwd_bwd_ms": ms_fb, "fwd_tflops": flops / ms_f / 1e9, "fwd_bwd_tflops": 3.5 * flops / ms_fb / 1e9}
        log(f"  cuda {name}: fwd {ms_f:.3f} ms, fwd+bwd {ms_fb:.3f} ms")

    table = build_block_table(doc, role, block_m=64, block_n=64)
    bench("triton_gem", lambda: triton_gem_attention(q, k, v, doc, role, block_table=table), exact_flops)
    # flex_gem_attention runs the compiled flex_attention with the batch's BlockMask (built once, cached)
    bench("flex_gem", lambda: flex_gem_attention(q, k, v, doc, role), exact_flops)
    try:
        from flash_attn import flash_attn_func

        qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dof = do.transpose(1, 2).contiguous()
        ms_f = do_bench(lambda: flash_attn_func(qf, kf, vf, causal=True))
        ms_fb = do_bench(lambda: flash_attn_func(qf, kf, vf, causal=True).backward(dof))
        out["fa2_causal"] = {"fwd_ms": ms_f, "fwd_bwd_ms": ms_fb, "fwd_tflops": causal_flops / ms_f / 1e9, "fwd_bwd_tflops": 3.5 * causal_flops / ms_fb / 1e9}
    except ImportError:
        out["fa2_causal"] = {"skipped": "flash_attn is not installed"}
    return out


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def memory_case(backend: str, L: int, args) -> dict:
    """Run in a fresh process: peak memory of one forward of ``backend`` ('flex': compiled
    FlexAttention; 'dense': the dense-mask reference) on a corpus packing of length L."""
    from megatron_gem.attention import batch_cache, dispatch

    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    lengths, _ = corpus_lengths(args.max_doc_len)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    doc, role, _, _ = pack_rows(lengths, args.memory_batch, L, config, args.seed + L)
    doc, role = doc.to(dev), role.to(dev)
    g = torch.Generator().manual_seed(args.seed)
    dt = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(args.memory_batch, args.heads, L, args.head_dim, generator=g).to(dev, dt)
    k = torch.randn(args.memory_batch, args.kv_heads, L, args.head_dim, generator=g).to(dev, dt)
    v = torch.randn_like(k)
    fn = {"flex": dispatch.flex_gem_attention, "dense": dispatch.dense_gem_attention}[backend]
    with torch.no_grad():
        t0 = time.perf_counter()
        if backend == "flex":  # warm-up on another batch object: flex compiles here (the dense path has nothing to warm)
            fn(q, k, v, doc.clone(), role.clone())
        warm_s = time.perf_counter() - t0
        batch_cache.clear_batch_caches()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _proc_status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        out = fn(q, k, v, doc, role)  # derives the BlockMask / dense mask of this batch, then attends
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        call_s = time.perf_counter() - t0
    return {
        "backend": backend,
        "seq_len": L,
        "device": dev,
        "dtype": str(dt).replace("torch.", ""),
        "peak_above_before_bytes": peak - before,
        "before_bytes": before,
        "peak_bytes": peak,
        "output_bytes": out.numel() * out.element_size(),
        "qkv_bytes": sum(x.numel() * x.element_size() for x in (q, k, v)),
        "warmup_s": warm_s,
        "call_s": call_s,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "VmHWM after clear_refs, minus VmRSS before",
    }


def memory_figures(args) -> dict:
    """One subprocess per (backend, L); a case that fails (e.g. out of memory) is recorded."""
    runs = []
    for L in args.memory_seq:
        for backend in ("flex", "dense"):
            log(f"memory: {backend} L={L} (own process)")
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", backend, str(L), *_shape_flags(args)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
            if proc.returncode != 0:
                runs.append({"backend": backend, "seq_len": L, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1], "returncode": proc.returncode})
                log(f"  failed: {runs[-1]['error']}")
                continue
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(f"  peak above before: {runs[-1]['peak_above_before_bytes'] / 2**20:.1f} MiB ({runs[-1]['call_s']:.2f} s)")
    growth = {}
    for backend in ("flex", "dense"):
        ok = {r["seq_len"]: r["peak_above_before_bytes"] for r in runs if r["backend"] == backend and "error" not in r}
        Ls = sorted(ok)
        # peak(2L) / peak(L): about 2 for memory linear in L, about 4 for quadratic
        growth[backend] = {f"{a}->{b}": ok[b] / ok[a] for a, b in zip(Ls, Ls[1:]) if ok[a] > 0}
    return {"runs": runs, "growth_per_doubling": growth, "batch": args.memory_batch}


def _shape_flags(args) -> list[str]:
    return [
        "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
        "--max-doc-len", str(args.max_doc_len), "--seed", str(args.seed), "--memory-batch", str(args.memory_batch),
    ]  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description="GEM attention benchmark on realistic packings")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 32768])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64, help="BLOCK_M = BLOCK_N of the table (the GPU launcher's tiling)")
    ap.add_argument("--max-doc-len", type=int, default=4096, help="cap on one document's length in tokens")
    ap.add_argument("--cpu-max-len", type=int, default=4096, help="longest L for the CPU sdpa timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-seq", type=int, nargs="*", default=[8192, 16384, 32768], help="lengths of the peak-memory cases (none: skip them)")
    ap.add_argument("--memory-batch", type=int, default=1, help="rows of the peak-memory cases")
    ap.add_argument("--memory-case", nargs=2, metavar=("BACKEND", "L"), help=argparse.SUPPRESS)  # the per-case subprocess
    args = ap.parse_args(argv)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case[0], int(args.memory_case[1]), args)))
        return
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    lengths, source = corpus_lengths(args.max_doc_len)
    log(f"corpus: {source}; median {int(np.median(lengths))} tokens, mean {lengths.mean():.1f}, p99 {int(np.percentile(lengths, 99))}")
    H, D, bs = args.heads, args.head_dim, args.block
    result = {
        "device": "cuda" if cuda else "cpu",
        "load_average_1m_at_start": os.getloadavg()[0],  # timings on a shared machine are only as good as this
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "corpus": source,
        "corpus_doc_len": {"median": float(np.median(lengths)), "mean": float(lengths.mean()), "p99": float(np.percentile(lengths, 99))},
        "layout": {"K": 1, "p_raw": 0.8, "layout": "split"},
        "shape": {"batch": args.batch, "heads": H, "kv_heads": args.kv_heads, "head_dim": D, "block_m": bs, "block_n": bs},
        "flops_convention": "forward = 4 * D * H * (query, key) pairs; tile FLOPs = 4 * D * H * block_m * block_n",
        "runs": [],
        "skipped": [],
    }
    for L in args.seq:
        log(f"L={L}: packing {args.batch} rows")
        doc, role, n_docs, n_gem = pack_rows(lengths, args.batch, L, config, args.seed + L)
        table = build_block_table(doc, role, block_m=bs, block_n=bs)
        build_s = median_time(lambda: build_block_table(doc, role, block_m=bs, block_n=bs), args.reps)
        n_q = table.num_q_blocks
        partial = int(table.kv_num_blocks.sum())
        full = int(table.full_kv_num_blocks.sum())
        causal_tiles = args.batch * n_q * (n_q + 1) // 2
        pairs = int(allowed_pair_count(doc, role).sum())
        causal_pairs = args.batch * L * (L + 1) // 2
        run = {
            "seq_len": L,
            "documents": n_docs,
            "gem_documents": n_gem,
            "tiles_visited": partial + full,
            "tiles_partial": partial,
            "tiles_full": full,
            "tiles_dense_causal": causal_tiles,
            "visited_fraction_of_causal": (partial + full) / causal_tiles,
            "flops_executed": 4 * D * H * bs * bs * (partial + full),
            "flops_exact_allowed": 4 * D * H * pairs,
            "flops_dense_causal": 4 * D * H * causal_pairs,
            "block_table_build_s": build_s,
            "block_table_bytes": table.nbytes(),
            "dense_mask_bytes": args.batch * L * L,  # torch.bool
        }
        run["executed_over_exact"] = run["flops_executed"] / run["flops_exact_allowed"]
        run["table_over_dense_mask"] = run["block_table_bytes"] / run["dense_mask_bytes"]
        log(
            f"  visited {run['tiles_visited']}/{causal_tiles} causal tiles ({run['visited_fraction_of_causal']:.4f}), "
            f"executed/exact FLOPs {run['executed_over_exact']:.2f}, table {run['block_table_bytes']} B vs mask {run['dense_mask_bytes']} B, "
            f"build {build_s * 1e3:.1f} ms"
        )
        if cuda:
            run["cuda"] = cuda_figures(doc, role, args, run["flops_exact_allowed"], run["flops_dense_causal"])
        elif L <= args.cpu_max_len:
            from megatron_gem.attention.dispatch import sdpa_gem_attention

            q = torch.randn(args.batch, H, L, D, requires_grad=True)
            k = torch.randn(args.batch, args.kv_heads, L, D, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            do = torch.randn_like(q)
            fwd = median_time(lambda: sdpa_gem_attention(q, k, v, doc, role), max(1, args.reps // 2))
            fwd_bwd = median_time(lambda: sdpa_gem_attention(q, k, v, doc, role).backward(do), max(1, args.reps // 2))
            run["cpu_sdpa"] = {"fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "threads": torch.get_num_threads()}
            log(f"  cpu sdpa: fwd {fwd:.3f} s, fwd+bwd {fwd_bwd:.3f} s")
        else:
            result["skipped"].append(
                {
                    "seq_len": L,
                    "what": "cpu sdpa timing",
                    "why": f"L > --cpu-max-len={args.cpu_max_len}: the dense path holds a [B, L, L] mask and [B, H, L, L] scores",
                }
            )
        if not cuda:
            result["skipped"].append(
                {
                    "seq_len": L,
                    "what": "triton / flex / FA2 TFLOP/s",
                    "why": "no CUDA device (the Triton interpreter is a correctness tool, not a performance path)",
                }
            )
        result["runs"].append(run)
    if args.memory_seq:
        result["memory"] = memory_figures(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
