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
Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
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
    flex = torch.compile(flex_gem_attention)
    bench("flex_gem", lambda: flex(q, k, v, doc, role), exact_flops)
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
    args = ap.parse_args(argv)
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
