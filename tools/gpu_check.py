#!/usr/bin/env python
"""GPU check of the GEM attention kernel (issue 16): correctness, speed, tuning, a training step.

    python tools/gpu_check.py [--parts a,b,c,d] [--output DIR] [--time-budget-s 300] [--quick]

One command for one H200 (about 5 minutes with the default budget). Parts:
  a  correctness: the Triton kernel, sdpa and flex against the fp32 reference of the kernel
     tests (megatron_gem.kernels.testing), bf16 and fp16, outputs and dQ/dK/dV, several layouts
     incl. GQA/MQA and suffix_sees_bos; error bound = 2 x the low-precision reference's own
     error + slack (flash-attention style, the same bound as tests/kernels).
  b  speed: bf16, Hq:Hkv 32:8, head dims 128 and 64, 8k/16k/32k tokens in one row; masks dense
     causal, document-causal and the full GEM rule (K=1, p_raw 0.8, split, laid out by
     megatron_gem.gem.layout) on two packings: document lengths drawn from a real corpus, and
     FlashMask-style (3-7 documents at 8k, 6-10 at 16k, 10-14 at 32k); forward, backward and
     forward+backward ms (triton.testing.do_bench, median) and TFLOP/s on allowed pairs and on
     visited tiles; against torch.compile'd FlexAttention with the same mask_mod
     (megatron_gem.gem.mask.flex_mask_mod; BlockMask built once, build time reported) and, on
     dense causal, SDPA's flash and cuDNN backends. Block table build time reported separately.
  c  tuning: a small sweep of what default_launch_config exposes (tiles, warps and stages per
     kernel, the dK/dV query slice sub_m) for head dims 64 and 128 on the GEM mask at 16k, each
     candidate checked against the default config's results; prints the change to make.
  d  a mixed-NTP training step with transformers: Llama-3.2-1B-shaped LlamaConfig (random
     weights, bf16), packed rows of 4096 (megatron_gem.data.packing), attention through the
     project's HF adapter (megatron_gem.attention.hf): triton vs sdpa (dense mask) vs plain
     causal (SDPA flash); tokens/s, MFU, peak memory.
Targets (reported met / missed): GEM-mask fwd+bwd time <= FlexAttention's on the same mask;
dense-causal forward >= 0.9x SDPA-flash; GEM triton training step >= 0.95x plain causal tokens/s.

Each part runs in its own subprocess with its share of --time-budget-s (unused time passes on),
so a crash or a sticky CUDA error in one part loses no other part's figures. Every part's
failure is caught and recorded. Files in --output (default $OUT if set, else ./gpu_check_out):
gpu_check.json (everything), gpu_check.md (tables), gpu_check.log (progress), part_X.json
(each part's own results, written as it goes). The last stdout line is one JSON object with the
figures. Without CUDA (--quick on CPU, for tests) the kernel runs in the Triton interpreter,
timings are interpreter times (no performance meaning) and CUDA-only measurements are skipped
with their reason. Imports only torch, numpy, triton, transformers (part d) and megatron_gem's
gem / attention / kernels / data.packing modules: no deepspeed, no megatron-core.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PARTS = ("a", "b", "c", "d")
# Share of the time budget per part; a part's unused time passes to the parts after it.
SHARES = {"a": 0.15, "b": 0.40, "c": 0.27, "d": 0.18}
DEFAULT_BUDGET_S = 300.0
QUICK_BUDGET_S = 240.0
# Dense bf16 peak used for MFU: the H100/H200 SXM datasheet figure (.library/device/H200.md:
# "dense bf16 about 990 TFLOP/s"). Part "env" also measures a bf16 matmul on the card itself.
PEAK_BF16_TFLOPS = 989.0

# ---------------------------------------------------------------------------------------------
# Document lengths of a real corpus
# ---------------------------------------------------------------------------------------------
CORPUS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
BYTES_PER_TOKEN = 4
N_QUANTILES = 128
# corpus_length_table() on the development machine (2026, Debian python3.11-doc 3.11.2-6+deb12u8:
# 497 reST sources, 67,473 paragraphs of >= 20 characters, tokens = ceil(UTF-8 bytes / 4),
# median 25, mean 39.9, p99 187, max 4838): the 128 quantiles at (i + 0.5) / 128. The device has
# no such corpus, so it samples from this table; tests/kernels/test_gpu_check.py recomputes it
# from the corpus where installed and checks it equals this table.
EMBEDDED_LENGTHS = (
    5,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    6,
    7,
    7,
    7,
    7,
    7,
    8,
    8,
    8,
    8,
    9,
    9,
    9,
    9,
    10,
    10,
    10,
    10,
    11,
    11,
    11,
    12,
    12,
    12,
    12,
    13,
    13,
    13,
    14,
    14,
    14,
    15,
    15,
    15,
    16,
    16,
    16,
    17,
    17,
    18,
    18,
    18,
    19,
    19,
    20,
    20,
    21,
    21,
    22,
    22,
    23,
    23,
    24,
    24,
    25,
    26,
    26,
    27,
    27,
    28,
    29,
    29,
    30,
    31,
    31,
    32,
    33,
    33,
    34,
    35,
    36,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    45,
    46,
    47,
    48,
    49,
    50,
    52,
    53,
    54,
    55,
    57,
    58,
    59,
    61,
    62,
    64,
    66,
    67,
    69,
    71,
    73,
    75,
    77,
    79,
    82,
    85,
    87,
    91,
    94,
    98,
    103,
    107,
    113,
    120,
    128,
    139,
    153,
    178,
    260,
)
EMBEDDED_SOURCE = (
    "embedded table: 128 quantiles of the paragraph lengths of Debian python3.11-doc 3.11.2-6+deb12u8 "
    "(497 reST sources, 67,473 paragraphs >= 20 chars, tokens ~ UTF-8 bytes / 4), measured on the development machine"
)


def corpus_length_table(pattern: str = CORPUS_GLOB) -> tuple[np.ndarray, str] | None:
    """The 128-quantile table of paragraph lengths (estimated tokens) of the installed
    python3.11-doc reST sources, or None when the corpus is not installed."""
    files = sorted(glob.glob(pattern, recursive=True))
    lengths = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for para in f.read().split("\n\n"):
                para = para.strip()
                if len(para) >= 20:
                    lengths.append(math.ceil(len(para.encode()) / BYTES_PER_TOKEN))
    if not lengths:
        return None
    q = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    table = np.quantile(np.array(lengths), q, method="nearest").astype(np.int64)
    return (
        table,
        f"measured here: python3.11-doc reST paragraphs ({len(files)} files, {len(lengths)} paragraphs, tokens ~ bytes/{BYTES_PER_TOKEN}), {N_QUANTILES} quantiles",
    )


def document_lengths() -> tuple[np.ndarray, str]:
    got = corpus_length_table()
    if got is not None:
        return got
    return np.array(EMBEDDED_LENGTHS, dtype=np.int64), EMBEDDED_SOURCE


# ---------------------------------------------------------------------------------------------
# Packed rows (doc_ids, roles) for the speed and tuning parts
# ---------------------------------------------------------------------------------------------
def flashmask_doc_range(L: int) -> tuple[int, int]:
    """Documents per row of the FlashMask-style packing: 3-7 at <= 8k, 10-14 at >= 32k, 6-10 between."""
    if L <= 8192:
        return 3, 7
    if L >= 32768:
        return 10, 14
    return 6, 10


def corpus_docs(L: int, table: np.ndarray, rng: np.random.Generator) -> list[int]:
    out, total = [], 0
    while total < L:
        n = int(rng.choice(table))
        out.append(n)
        total += n
    return out


def flashmask_docs(L: int, rng: np.random.Generator) -> list[int]:
    lo, hi = flashmask_doc_range(L)
    n = int(rng.integers(lo, hi + 1))
    cuts = np.sort(rng.choice(np.arange(1, L), size=n - 1, replace=False))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [L]]))]


def layout_row(doc_lengths: list[int], L: int, gem: bool, rng: np.random.Generator):
    """doc_ids, roles int64 [1, L]: the documents in order, each plain (document-causal) or laid
    out by the GEM training rule (draw_layout: K=1, p_raw 0.8, split); the last one cut at L."""
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.layout import build_layout, draw_layout

    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    doc = np.zeros(L, dtype=np.int64)
    role = np.zeros(L, dtype=np.int64)
    pos, n_gem, n_docs = 0, 0, 0
    for d, n in enumerate(doc_lengths):
        if pos >= L:
            break
        layout, cut = draw_layout(n, config, rng) if gem else ("plain", None)
        _, r = build_layout(np.zeros(n, dtype=np.int64), layout, [0] * config.num_special_tokens, cut=cut)
        r = r[: L - pos]
        doc[pos : pos + len(r)] = d
        role[pos : pos + len(r)] = r
        pos += len(r)
        n_docs += 1
        n_gem += layout != "plain"
    return torch.from_numpy(doc)[None], torch.from_numpy(role)[None], {"documents": n_docs, "gem_documents": n_gem}


def make_mask(kind: str, L: int, table: np.ndarray, seed: int):
    """kind: causal | doc_corpus | gem_corpus | doc_flashmask | gem_flashmask."""
    if kind == "causal":
        z = torch.zeros(1, L, dtype=torch.int64)
        return z, z.clone(), {"documents": 1, "gem_documents": 0}
    packing = kind.split("_")[1]
    rng = np.random.default_rng([seed, L, 0 if packing == "corpus" else 1])
    lengths = corpus_docs(L, table, rng) if packing == "corpus" else flashmask_docs(L, rng)
    return layout_row(lengths, L, kind.startswith("gem"), rng)


# ---------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def out(self, reserve_s: float = 0.0) -> bool:
        return self.left() <= reserve_s


_LOG_FILE = None


def log(*a) -> None:
    msg = " ".join(str(x) for x in a)
    print(msg, file=sys.stderr, flush=True)
    if _LOG_FILE is not None:
        with open(_LOG_FILE, "a") as f:
            f.write(msg + "\n")


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:600]}"


class Timer:
    """Milliseconds of ``fn``: triton.testing.do_bench (CUDA events, median) on CUDA; on CPU the
    median of a few perf_counter runs (interpreter times: no performance meaning)."""

    def __init__(self, cuda: bool, quick: bool):
        self.cuda, self.quick = cuda, quick

    def ms(self, fn, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
        times = []
        runs = 1 if self.quick else 4  # quick: one run, no warm-up (the figure only proves the path)
        for i in range(runs):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            if i or runs == 1:  # else the first run is the warm-up
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def host_ms(self, fn, reps: int = 5) -> float:
        """Median wall time of ``fn`` with a device sync (for host-side builds: tables, masks)."""
        reps = 1 if self.quick else reps
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def gemm_tflops(cuda: bool) -> dict:
    """The card's bf16 matmul rate on random data (8192^3): the ceiling to read TFLOP/s against."""
    if not cuda:
        return {"skipped": "no CUDA device"}
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return {"shape": [n, n, n], "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def environment(cuda: bool) -> dict:
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"not importable: {error_text(e)}"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
        )
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
            ).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {error_text(e)}"
    else:
        env["gpu"] = None
    return env


def attention_flops(D: int, Hq: int, pairs: int) -> int:
    """Forward FLOPs: two matmuls (QK^T, PV) of 2 * D each per (query, key) pair and head."""
    return 4 * D * Hq * pairs


# Backward = 2.5 x forward (FlashAttention's convention: 5 matmuls against 2). The GEM kernel's
# two-pass backward recomputes QK^T in both passes (7 matmuls); TFLOP/s use the convention.
BWD_FACTOR = 2.5


# ---------------------------------------------------------------------------------------------
# Part a: correctness
# ---------------------------------------------------------------------------------------------
# name, B, L, Hq, Hkv, D, K, styles (or "corpus"), suffix_sees_bos
CASES_GPU = [
    ("mixed+straddle MHA d64", 2, 1000, 8, 8, 64, 1, ("mixed", "straddle"), False),
    ("straddle+tiny GQA4 d128", 2, 777, 8, 2, 128, 2, ("straddle", "tiny"), False),
    ("long+plain MQA d64 bos", 2, 2048, 4, 1, 64, 5, ("long", "plain"), True),
    ("chaos+mixed GQA2 d128 bos", 2, 1531, 8, 4, 128, 2, ("chaos", "mixed"), True),
    ("corpus GEM packing 32:8 d128", 1, 4096, 32, 8, 128, 1, "corpus", False),
]
CASES_QUICK = [
    ("chaos+straddle MQA d16 bos", 2, 70, 2, 1, 16, 2, ("chaos", "straddle"), True),
    ("corpus GEM packing 2:1 d32", 1, 77, 2, 1, 32, 1, "corpus", False),
]


def part_a(ctx: dict, clock: Clock, res: dict, save) -> None:
    from megatron_gem.attention.dispatch import gem_attention
    from megatron_gem.gem.mask import gem_mask
    from megatron_gem.kernels.testing import PRECISION, error_report, make_inputs, random_batch, reference_attention, run_with_grads

    cuda, dev = ctx["cuda"], ctx["device"]
    table, _ = document_lengths()
    cases = CASES_QUICK if ctx["quick"] else CASES_GPU
    res.update(checks=[], skipped=[], bound="err <= 2 * err(reference in the input dtype) + slack * max(1, max|ref|); slack 1e-4 fp16, 1e-3 bf16")
    dtypes = (torch.bfloat16, torch.float16)
    todo = [(c, dt) for dt in dtypes for c in cases]  # both dtypes early: case order within dtype
    todo.sort(key=lambda x: cases.index(x[0]))
    for i, (case, dtype) in enumerate(todo):
        name, B, L, Hq, Hkv, D, K, styles, bos = case
        tag = f"{name} {str(dtype).replace('torch.', '')}"
        if clock.out():
            res["skipped"].append({"case": tag, "why": "part time budget spent"})
            continue
        seed = 1000 + i
        if styles == "corpus":
            doc, role, _ = make_mask("gem_corpus", L, table, seed)
        else:
            doc, role = random_batch(seed, B, L, K, styles=styles, block=64 if cuda else 16)
        doc, role = doc.to(dev), role.to(dev)
        q, k, v, do = make_inputs(seed, B, Hq, Hkv, L, D, dtype, device=dev)
        scale = D**-0.5
        mask = gem_mask(doc, role, suffix_sees_bos=bos)
        hi, _ = PRECISION[dtype]
        t0 = time.monotonic()
        ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, scale, hi), q, k, v, do.to(hi))
        low = run_with_grads(lambda q, k, v: reference_attention(q, k, v, mask, scale, dtype), q, k, v, do)
        mask = None
        for backend in ("triton", "sdpa", "flex"):
            row = {
                "case": name,
                "dtype": str(dtype).replace("torch.", ""),
                "backend": backend,
                "B": B,
                "L": L,
                "Hq": Hq,
                "Hkv": Hkv,
                "D": D,
                "K": K,
                "suffix_sees_bos": bos,
            }
            try:

                def fn(q, k, v, backend=backend):
                    return gem_attention(q, k, v, doc, role, scale=scale, backend=backend, suffix_sees_bos=bos)

                if backend == "flex" and not cuda:
                    # PyTorch has no FlexAttention backward on CPU: forward only.
                    with torch.no_grad():
                        got = (fn(q, k, v), None, None, None)
                    row["note"] = "forward only: FlexAttention has no backward on CPU"
                else:
                    got = run_with_grads(fn, q, k, v, do)
                ok = True
                for tname, g, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
                    if g is None:
                        continue
                    rep = error_report(g, r, lo, dtype)
                    row[tname] = rep
                    ok = ok and rep["ok"]
                row["ok"] = ok
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=error_text(e))
                log(traceback.format_exc())
            res["checks"].append(row)
            log(
                f"  a: {tag} {backend}: {'ok' if row['ok'] else 'FAIL'} "
                + " ".join(f"{t}={row[t]['err']:.2e}/{row[t]['bound']:.2e}" for t in ("out", "dq", "dk", "dv") if t in row)
            )
        res.setdefault("case_seconds", {})[tag] = round(time.monotonic() - t0, 2)
        ref = low = q = k = v = do = None
        save()
    checks = res["checks"]
    res["summary"] = {
        "checks": len(checks),
        "failed": [f"{c['case']} {c['dtype']} {c['backend']}" for c in checks if not c["ok"]],
        "all_ok": bool(checks) and all(c["ok"] for c in checks),
        "triton_all_ok": any(c["backend"] == "triton" for c in checks) and all(c["ok"] for c in checks if c["backend"] == "triton"),
        "cases_skipped": len(res["skipped"]),
    }


# ---------------------------------------------------------------------------------------------
# Part b: speed
# ---------------------------------------------------------------------------------------------
MASKS = ("gem_corpus", "causal", "doc_corpus", "gem_flashmask", "doc_flashmask")


class FlexRunner:
    """torch.compile'd flex_attention with ONE mask_mod (flex_mask_mod over fixed buffers of the
    longest row, refilled per mask), so masks of one shape share one compiled graph."""

    def __init__(self, L_max: int, device, cuda: bool):
        from torch.nn.attention.flex_attention import flex_attention

        from megatron_gem.gem.mask import flex_mask_mod

        self.cuda = cuda
        self.doc = torch.zeros(1, L_max, dtype=torch.int64, device=device)
        self.role = torch.zeros(1, L_max, dtype=torch.int64, device=device)
        # suffix_sees_bos=False: the doc-start tensor flex_mask_mod derives once is never read.
        self.mask_mod = flex_mask_mod(self.doc, self.role, suffix_sees_bos=False)
        self.device = device
        if cuda:
            import torch._dynamo as dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # the name moved across torch versions
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
                    break
            self.fn = torch.compile(flex_attention)
        else:
            self.fn = flex_attention  # eager (forward only on CPU)

    def block_mask(self, doc, role):
        from torch.nn.attention.flex_attention import create_block_mask

        L = doc.shape[1]
        self.doc[:, :L].copy_(doc)
        self.role[:, :L].copy_(role)
        return create_block_mask(self.mask_mod, 1, None, L, L, device=self.device)

    def __call__(self, q, k, v, block_mask, scale):
        return self.fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _flex_tiles(bm) -> int:
    n = int(bm.kv_num_blocks.sum())
    if bm.full_kv_num_blocks is not None:
        n += int(bm.full_kv_num_blocks.sum())
    return n


def time_fwd_bwd(timer: Timer, f, q, k, v, do, fwd_flops: int, tile_flops: int | None) -> dict:
    """fwd, bwd (backward of one retained forward) and fwd+bwd ms, and TFLOP/s on allowed pairs
    (and on visited tiles when ``tile_flops`` is given)."""
    out = {}
    with torch.no_grad():
        out["fwd_ms"] = timer.ms(lambda: f(q, k, v))
    o = f(q, k, v)
    out["bwd_ms"] = timer.ms(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
    o = None
    out["fwd_bwd_ms"] = timer.ms(lambda: f(q, k, v).backward(do), grad_to_none=[q, k, v])
    total = (1 + BWD_FACTOR) * fwd_flops
    out["fwd_tflops"] = fwd_flops / out["fwd_ms"] / 1e9
    out["bwd_tflops"] = BWD_FACTOR * fwd_flops / out["bwd_ms"] / 1e9
    out["fwd_bwd_tflops"] = total / out["fwd_bwd_ms"] / 1e9
    if tile_flops is not None:
        out["fwd_tflops_tiles"] = tile_flops / out["fwd_ms"] / 1e9
        out["fwd_bwd_tflops_tiles"] = (1 + BWD_FACTOR) * tile_flops / out["fwd_bwd_ms"] / 1e9
    return out


def sdpa_causal(timer: Timer, q, k, v, do, backend_name: str, fwd_flops: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    kk, vv, gqa = k, v, "enable_gqa"

    def f(q, k, v):
        with sdpa_kernel(backend):
            if gqa == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        out = time_fwd_bwd(timer, f, q, kk, vv, do, fwd_flops, None)
    except RuntimeError:
        # This backend refuses enable_gqa: give it K/V already repeated to Hq heads (outside the
        # timing; the same FLOPs, more K/V bytes read).
        group = q.shape[1] // k.shape[1]
        kk = k.detach().repeat_interleave(group, 1).requires_grad_()
        vv = v.detach().repeat_interleave(group, 1).requires_grad_()
        gqa = "repeated K/V"
        out = time_fwd_bwd(timer, f, q, kk, vv, do, fwd_flops, None)
    out["gqa"] = gqa
    return out


def part_b(ctx: dict, clock: Clock, res: dict, save) -> None:
    from megatron_gem.kernels import allowed_pair_count, build_block_table, default_launch_config, triton_gem_attention

    cuda, dev, quick = ctx["cuda"], ctx["device"], ctx["quick"]
    timer = Timer(cuda, quick)
    table, source = document_lengths()
    Ls = [64] if quick else [8192, 16384, 32768]
    Ds = [16] if quick else [128, 64]
    Hq, Hkv = (2, 1) if quick else (32, 8)
    dtype = torch.bfloat16
    res.update(
        corpus=source,
        dtype="bf16",
        heads=[Hq, Hkv],
        batch=1,
        seq_lens=Ls,
        head_dims=Ds,
        masks=list(MASKS),
        flops_convention=f"forward = 4 * D * Hq * allowed pairs; backward = {BWD_FACTOR} x forward; tiles: the same per visited tile element",
        flashmask_docs={str(L): flashmask_doc_range(L) for L in Ls},
        runs=[],
        skipped=[],
    )
    flex = None
    try:
        flex = FlexRunner(max(Ls), dev, cuda)
    except Exception as e:  # noqa: BLE001
        res["skipped"].append({"what": "flex", "why": f"FlexAttention unavailable: {error_text(e)}"})
    # Target-relevant masks for every shape first, then the rest.
    order = [(m, D, L) for group in (MASKS[:2], MASKS[2:]) for D in Ds for L in Ls for m in group]
    for mask_kind, D, L in order:
        tag = f"{mask_kind} L={L} D={D}"
        if clock.out(reserve_s=3):
            res["skipped"].append({"what": tag, "why": "part time budget spent"})
            continue
        log(f"  b: {tag}")
        run = {"mask": mask_kind, "L": L, "D": D}
        res["runs"].append(run)
        try:
            doc, role, info = make_mask(mask_kind, L, table, seed=20260 + D)
            run.update(info)
            doc, role = doc.to(dev), role.to(dev)
            cfg = default_launch_config(D, torch.device(dev))
            bm, bn = cfg["block_m"], cfg["block_n"]
            run["block_table_build_ms"] = timer.host_ms(lambda: build_block_table(doc, role, block_m=bm, block_n=bn), reps=3 if quick else 5)
            bt = build_block_table(doc, role, block_m=bm, block_n=bn)
            pairs = int(allowed_pair_count(doc, role).sum())
            partial, full = int(bt.kv_num_blocks.sum()), int(bt.full_kv_num_blocks.sum())
            nq = bt.num_q_blocks
            fwd_flops = attention_flops(D, Hq, pairs)
            run.update(
                allowed_pairs=pairs,
                causal_pairs=L * (L + 1) // 2,
                tiles=[bm, bn],
                tiles_partial=partial,
                tiles_full=full,
                tiles_causal=nq * (nq + 1) // 2,
                fwd_flops=fwd_flops,
                fwd_flops_tiles=attention_flops(D, Hq, bm * bn * (partial + full)),
            )
            g = torch.Generator().manual_seed(L + D)
            q = torch.randn(1, Hq, L, D, generator=g).to(dev, dtype).requires_grad_()
            k = torch.randn(1, Hkv, L, D, generator=g).to(dev, dtype).requires_grad_()
            v = torch.randn(1, Hkv, L, D, generator=g).to(dev, dtype).requires_grad_()
            do = torch.randn(1, Hq, L, D, generator=g).to(dev, dtype)
            scale = D**-0.5

            def tri(q, k, v):
                return triton_gem_attention(q, k, v, doc, role, scale=scale, block_table=bt)

            try:
                run["triton"] = time_fwd_bwd(timer, tri, q, k, v, do, fwd_flops, run["fwd_flops_tiles"])
                log(f"     triton: fwd {run['triton']['fwd_ms']:.3f} ms, fwd+bwd {run['triton']['fwd_bwd_ms']:.3f} ms")
            except Exception as e:  # noqa: BLE001
                run["triton"] = {"error": error_text(e)}
                log(traceback.format_exc())
            save()
            if flex is not None:
                run["flex"] = {}
                try:
                    run["flex"]["block_mask_build_ms"] = timer.host_ms(lambda: flex.block_mask(doc, role), reps=3)
                    bmask = flex.block_mask(doc, role)
                    run["flex"]["block_mask_tiles"] = _flex_tiles(bmask)
                    run["flex"]["block_size"] = list(bmask.BLOCK_SIZE)
                    tile_flops = attention_flops(D, Hq, bmask.BLOCK_SIZE[0] * bmask.BLOCK_SIZE[1] * run["flex"]["block_mask_tiles"])

                    def fx(q, k, v):
                        if not cuda:  # CPU flex refuses inputs that require grad, even without grad mode
                            q, k, v = q.detach(), k.detach(), v.detach()
                        return flex(q, k, v, bmask, scale)

                    t0 = time.perf_counter()
                    with torch.no_grad():
                        o_flex = fx(q, k, v)
                    timer.sync()
                    run["flex"]["first_fwd_s"] = time.perf_counter() - t0  # includes compiling
                    with torch.no_grad():
                        o_tri = tri(q, k, v)
                    run["flex"]["max_abs_diff_vs_triton"] = (o_flex.float() - o_tri.float()).abs().max().item()
                    o_flex = o_tri = None
                    if cuda:
                        t0 = time.perf_counter()
                        fx(q, k, v).backward(do)
                        timer.sync()
                        run["flex"]["first_fwd_bwd_s"] = time.perf_counter() - t0  # includes compiling the backward
                        run["flex"].update(time_fwd_bwd(timer, fx, q, k, v, do, fwd_flops, tile_flops))
                        log(f"     flex:   fwd {run['flex']['fwd_ms']:.3f} ms, fwd+bwd {run['flex']['fwd_bwd_ms']:.3f} ms")
                    else:
                        with torch.no_grad():
                            run["flex"]["fwd_ms"] = timer.ms(lambda: fx(q, k, v))
                        run["flex"]["note"] = "CPU: eager forward only (no FlexAttention backward on CPU; torch.compile'd flex is the CUDA path)"
                except Exception as e:  # noqa: BLE001
                    run["flex"]["error"] = error_text(e)
                    log(traceback.format_exc())
                save()
            if mask_kind == "causal":
                backends = ("FLASH_ATTENTION", "CUDNN_ATTENTION") if cuda else ("MATH",)
                for name in backends:
                    key = "sdpa_" + name.split("_")[0].lower()
                    try:
                        run[key] = sdpa_causal(timer, q, k, v, do, name, fwd_flops)
                        log(f"     {key}: fwd {run[key]['fwd_ms']:.3f} ms, fwd+bwd {run[key]['fwd_bwd_ms']:.3f} ms")
                    except Exception as e:  # noqa: BLE001
                        run[key] = {"error": error_text(e)}
                if not cuda:
                    run["note"] = "CPU: sdpa_math stands in for SDPA flash / cuDNN (CUDA only)"
            q = k = v = do = None
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            run["error"] = error_text(e)
            log(traceback.format_exc())
        save()


# ---------------------------------------------------------------------------------------------
# Part c: tuning the launch settings
# ---------------------------------------------------------------------------------------------
def _tilings(quick: bool):
    return [(32, 32), (16, 16)] if quick else [(64, 64), (128, 64), (64, 128), (128, 128), (64, 32)]


def _kernel_candidates(kernel: str, bm: int, quick: bool):
    if quick:
        return {"fwd": [(4, 1), (8, 2)], "bwd_dq": [(4, 1)], "bwd_dkdv": [(4, 1, 16)]}[kernel]
    if kernel in ("fwd", "bwd_dq"):
        return [(4, 2), (4, 3), (8, 2), (8, 3), (4, 4), (8, 4), (4, 1), (8, 1)]
    subs = [s for s in (16, 32, 64) if s <= bm]
    return [(w, st, s) for s in subs for w in (8, 4) for st in (1, 2, 3)]


def _rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def part_c(ctx: dict, clock: Clock, res: dict, save) -> None:
    from megatron_gem.kernels import build_block_table, default_launch_config
    from megatron_gem.kernels.gem_attention_triton import backward_delta, launch_backward_dkdv, launch_backward_dq, launch_forward

    cuda, dev, quick = ctx["cuda"], ctx["device"], ctx["quick"]
    timer = Timer(cuda, quick)
    table, source = document_lengths()
    L = 96 if quick else 16384
    Ds = [16] if quick else [64, 128]
    Hq, Hkv = (2, 1) if quick else (32, 8)
    res.update(mask="gem_corpus", L=L, heads=[Hq, Hkv], dtype="bf16", corpus=source, head_dims=Ds, per_head_dim={}, recommendation=[])
    doc, role, info = make_mask("gem_corpus", L, table, seed=20260)
    res.update(info)
    doc = doc.to(dev).to(torch.int32).contiguous()
    role = role.to(dev).to(torch.int32).contiguous()
    for di, D in enumerate(Ds):
        sub_clock = Clock(clock.left() / (len(Ds) - di))
        out = {"candidates": [], "skipped": 0}
        res["per_head_dim"][str(D)] = out
        try:
            g = torch.Generator().manual_seed(D)
            q = torch.randn(1, Hq, L, D, generator=g).to(dev, torch.bfloat16)
            k = torch.randn(1, Hkv, L, D, generator=g).to(dev, torch.bfloat16)
            v = torch.randn(1, Hkv, L, D, generator=g).to(dev, torch.bfloat16)
            do = torch.randn(1, Hq, L, D, generator=g).to(dev, torch.bfloat16)
            scale = D**-0.5
            base = default_launch_config(D, torch.device(dev))
            out["default"] = {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in base.items()}
            tables = {}

            def table_for(bm, bn):
                if (bm, bn) not in tables:
                    tables[(bm, bn)] = build_block_table(doc, role, block_m=bm, block_n=bn)
                return tables[(bm, bn)]

            # Reference results: the default config (checked against fp32 in part a).
            t0 = table_for(base["block_m"], base["block_n"])
            o_ref, lse_ref = launch_forward(q, k, v, doc, role, t0, scale, base)
            delta = backward_delta(o_ref, do)
            dk_ref, dv_ref = launch_backward_dkdv(do, q, k, v, lse_ref, delta, doc, role, t0, scale, base)
            dq_ref = launch_backward_dq(do, q, k, v, lse_ref, delta, doc, role, t0, scale, base)

            def measure(kernel, cfg):
                """ms of one kernel with ``cfg`` and its relative error against the default."""
                t = table_for(cfg["block_m"], cfg["block_n"])
                if kernel == "fwd":
                    o, _ = launch_forward(q, k, v, doc, role, t, scale, cfg)
                    err = _rel_err(o, o_ref)
                    ms = timer.ms(lambda: launch_forward(q, k, v, doc, role, t, scale, cfg), warmup=10, rep=40)
                elif kernel == "bwd_dkdv":
                    dk, dv = launch_backward_dkdv(do, q, k, v, lse_ref, delta, doc, role, t, scale, cfg)
                    err = max(_rel_err(dk, dk_ref), _rel_err(dv, dv_ref))
                    ms = timer.ms(lambda: launch_backward_dkdv(do, q, k, v, lse_ref, delta, doc, role, t, scale, cfg), warmup=10, rep=40)
                else:
                    dq = launch_backward_dq(do, q, k, v, lse_ref, delta, doc, role, t, scale, cfg)
                    err = _rel_err(dq, dq_ref)
                    ms = timer.ms(lambda: launch_backward_dq(do, q, k, v, lse_ref, delta, doc, role, t, scale, cfg), warmup=10, rep=40)
                return ms, err

            def try_one(kernel, cfg, stage):
                setting = cfg[kernel] if kernel != "bwd_dkdv" else (*cfg["bwd_dkdv"], cfg["sub_m"])
                row = {"stage": stage, "kernel": kernel, "block_m": cfg["block_m"], "block_n": cfg["block_n"], "setting": list(setting)}
                try:
                    ms, err = measure(kernel, cfg)
                    # bf16 results of another tiling / summation order differ by rounding only
                    row.update(ms=ms, rel_err_vs_default=err, ok=err < 2e-2)
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=error_text(e))
                out["candidates"].append(row)
                log(
                    f"  c: D={D} {stage} {kernel} tiles {cfg['block_m']}x{cfg['block_n']} {setting}: "
                    + (f"{row['ms']:.3f} ms err {row['rel_err_vs_default']:.1e}" if "ms" in row else row.get("error", ""))
                )
                return row

            # Stage 1: each tiling with the default per-kernel settings (8 warps for 128-row tiles).
            by_tiling = {}
            for bm, bn in _tilings(quick):
                if sub_clock.out():
                    out["skipped"] += 1
                    continue
                cfg = dict(base, block_m=bm, block_n=bn, sub_m=min(base["sub_m"], bm))
                if bm >= 128 and not quick:
                    cfg.update(fwd=(8, cfg["fwd"][1]), bwd_dq=(8, cfg["bwd_dq"][1]))
                rows = {kn: try_one(kn, cfg, "tiling") for kn in ("fwd", "bwd_dkdv", "bwd_dq")}
                if all(r.get("ok") for r in rows.values()):
                    by_tiling[(bm, bn)] = (sum(r["ms"] for r in rows.values()), cfg, rows)
                save()
            if not by_tiling:
                if out["candidates"]:
                    raise RuntimeError("no tiling ran correctly")
                out["note"] = "part time budget spent before this head dim"
                continue
            (bm, bn), (_, cfg, rows) = min(by_tiling.items(), key=lambda kv: kv[1][0])
            best = {kn: (rows[kn]["ms"], cfg[kn] if kn != "bwd_dkdv" else (*cfg["bwd_dkdv"], cfg["sub_m"])) for kn in rows}
            # Stage 2: at the best tiling, per-kernel settings, round robin so a short budget still
            # improves every kernel.
            queues = {kn: [c for c in _kernel_candidates(kn, bm, quick) if tuple(c) != tuple(best[kn][1])] for kn in best}
            while any(queues.values()) and not sub_clock.out():
                for kn in ("fwd", "bwd_dkdv", "bwd_dq"):
                    if not queues[kn] or sub_clock.out():
                        continue
                    setting = queues[kn].pop(0)
                    trial = dict(cfg)
                    if kn == "bwd_dkdv":
                        trial.update(bwd_dkdv=tuple(setting[:2]), sub_m=setting[2])
                    else:
                        trial[kn] = tuple(setting)
                    row = try_one(kn, trial, "settings")
                    if row.get("ok") and row["ms"] < best[kn][0]:
                        best[kn] = (row["ms"], tuple(setting))
                save()
            out["skipped"] += sum(len(qq) for qq in queues.values())
            tuned = {
                "block_m": bm,
                "block_n": bn,
                "fwd": tuple(best["fwd"][1]),
                "bwd_dq": tuple(best["bwd_dq"][1]),
                "bwd_dkdv": tuple(best["bwd_dkdv"][1][:2]),
                "sub_m": best["bwd_dkdv"][1][2],
            }
            default_rows = by_tiling.get((base["block_m"], base["block_n"]))
            tuned_ms = sum(b[0] for b in best.values())
            out["best"] = {
                "config": {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in tuned.items()},
                "kernel_ms": {kn: best[kn][0] for kn in best},
                "total_ms": tuned_ms,
            }
            if default_rows is not None:
                out["default_total_ms"] = default_rows[0]
                out["speedup_vs_default"] = default_rows[0] / tuned_ms
            same = all(tuple(tuned[k_]) == tuple(base[k_]) if isinstance(base[k_], tuple) else tuned[k_] == base[k_] for k_ in tuned)
            which = "head_dim <= 64" if D <= 64 else "head_dim > 64"
            if same:
                rec = f"default_launch_config ({which}, D={D}): keep the current setting {_fmt_cfg(base)}"
            else:
                gain = (
                    f" (fwd+dK/dV+dQ {tuned_ms:.3f} ms vs {default_rows[0]:.3f} ms for the current default, {default_rows[0] / tuned_ms:.2f}x)"
                    if default_rows
                    else ""
                )
                rec = f"default_launch_config ({which}, D={D}): return {_fmt_cfg(tuned)}{gain}; re-run `python -m megatron_gem.kernels.aot` (spills on sm_80/sm_90) before adopting"
            out["recommendation"] = rec
            res["recommendation"].append(rec)
            q = k = v = do = o_ref = dq_ref = dk_ref = dv_ref = None
        except Exception as e:  # noqa: BLE001
            out["error"] = error_text(e)
            log(traceback.format_exc())
        save()


def _fmt_cfg(cfg: dict) -> str:
    keys = ("block_m", "block_n", "fwd", "bwd_dq", "bwd_dkdv", "sub_m")
    return "{" + ", ".join(f'"{k}": {tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]}' for k in keys) + "}"


# ---------------------------------------------------------------------------------------------
# Part d: a GEM training step with transformers
# ---------------------------------------------------------------------------------------------
LLAMA_3_2_1B = dict(  # the published Llama-3.2-1B shape (random weights here, built from config)
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def training_batch(rows: int, L: int, vocab: int, table: np.ndarray, seed: int) -> dict:
    """A mixed-NTP micro-batch in the project's contract: documents with corpus lengths and random
    token ids, each laid out by draw_layout / build_layout (K=1, p_raw 0.8, split; the special
    token is the last vocabulary id), packed best-fit into rows of L (data.packing)."""
    from megatron_gem.data.packing import assemble_row, collate_rows, pack_lengths
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.layout import build_layout, draw_layout

    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    special = [vocab - 1]
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    while total < rows * L:
        n = int(min(rng.choice(table), L - 1))
        tokens = rng.integers(0, vocab - 1, size=n)
        layout, cut = draw_layout(n, config, rng)
        piece = build_layout(tokens, layout, special, cut=cut)
        pieces.append(piece)
        total += len(piece[0])
    offsets, order = pack_lengths([len(p[0]) for p in pieces], L)
    built = [assemble_row([pieces[i] for i in order[offsets[r] : offsets[r + 1]]], L) for r in range(len(offsets) - 1)]
    built.sort(key=lambda r: -int((r[2] >= 0).sum()))  # the fullest rows
    return collate_rows(built[:rows])


def count_matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: every nn.Linear weight (the tied LM head
    included once as a matmul), not the embedding lookup or the norms."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def part_d(ctx: dict, clock: Clock, res: dict, save) -> None:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.gem.losses import ntp_loss
    from megatron_gem.kernels import allowed_pair_count

    cuda, dev, quick = ctx["cuda"], ctx["device"], ctx["quick"]
    shape = TINY_LLAMA if quick else LLAMA_3_2_1B
    L = 96 if quick else 4096
    rows = 2 if quick else int(ctx.get("train_rows", 4))
    warmup, steps = (0, 1) if quick else (2, 4)
    dtype = torch.bfloat16
    table, source = document_lengths()
    res.update(
        model="tiny Llama (CPU quick mode)" if quick else "Llama-3.2-1B shape (random init)",
        config=shape,
        seq_len=L,
        rows=rows,
        dtype="bf16",
        optimizer="AdamW (fused on CUDA), lr 1e-5",
        transformers=transformers.__version__,
        corpus=source,
        rope="the config's default RoPE (speed-neutral)",
        variants={},
        skipped=[],
    )
    config = LlamaConfig(**shape, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = count_matmul_params(model)
    res.update(params=n_params, matmul_params=n_matmul)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    batch = {k: v.to(dev) for k, v in training_batch(rows, L, shape["vocab_size"], table, seed=7).items()}
    tokens = batch["input_ids"].numel()
    gem_pairs = int(allowed_pair_count(batch["doc_ids"], batch["roles"]).sum())
    causal_pairs = rows * L * (L + 1) // 2
    res.update(
        tokens_per_step=tokens,
        trained_tokens=int((batch["labels"] != -100).sum()),
        documents=len(torch.unique(batch["doc_ids"][batch["doc_ids"] >= 0])),
        gem_documents=len(torch.unique(batch["doc_ids"][batch["roles"] == 1])),
        allowed_pairs=gem_pairs,
        causal_pairs=causal_pairs,
    )
    save()
    D, Hq, layers = shape["head_dim"], shape["num_attention_heads"], shape["num_hidden_layers"]

    def step(variant):
        opt.zero_grad(set_to_none=True)
        kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        if variant != "causal_flash":
            kwargs.update(doc_ids=batch["doc_ids"], roles=batch["roles"])
        logits = model(**kwargs).logits
        loss = ntp_loss(logits, batch["labels"])
        loss.backward()
        opt.step()
        return loss.detach()

    variants = [("causal_flash", "sdpa"), ("gem_triton", "triton"), ("gem_sdpa", "sdpa")]
    for vi, (variant, backend) in enumerate(variants):
        if clock.out(reserve_s=2):
            res["skipped"].append({"variant": variant, "why": "part time budget spent"})
            continue
        out = {"attention_backend": backend}
        res["variants"][variant] = out
        try:
            use_gem_attention(model, backend=backend)
            ctxm = None
            if variant == "causal_flash" and cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                ctxm = SDPBackend.FLASH_ATTENTION
                out["sdpa_backend"] = "FLASH_ATTENTION (forced)"
            elif variant == "causal_flash":
                out["sdpa_backend"] = "default selection (CPU)"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if ctxm is not None:
                try:
                    t0 = time.perf_counter()
                    with sdpa_kernel(ctxm):
                        step(variant)
                    torch.cuda.synchronize()
                    out["first_step_s"] = time.perf_counter() - t0
                except RuntimeError as e:
                    ctxm = None
                    out["sdpa_backend"] = f"default selection (forced flash failed: {error_text(e)[:200]})"
            times, losses = [], []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                if ctxm is not None:
                    with sdpa_kernel(ctxm):
                        loss = step(variant)
                else:
                    loss = step(variant)
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                losses.append(float(loss))
                if i >= warmup:
                    times.append(dt)
                elif i == 0:
                    out.setdefault("first_step_s", dt)  # includes compiling the kernels
                if clock.out() and times:
                    out["note"] = f"budget: {len(times)} timed steps"
                    break
            pairs = causal_pairs if variant == "causal_flash" else gem_pairs
            step_s = statistics.median(times)
            model_flops = 6 * n_matmul * tokens + 3 * attention_flops(D, Hq, pairs) * layers
            out.update(
                step_s=step_s,
                step_times_s=times,
                tokens_per_s=tokens / step_s,
                losses=losses,
                loss_finite=all(math.isfinite(x) for x in losses),
                attention_pairs=pairs,
                model_flops_per_step=model_flops,
                achieved_tflops=model_flops / step_s / 1e12,
            )
            if cuda:
                out["mfu"] = out["achieved_tflops"] / PEAK_BF16_TFLOPS
                out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                out["mfu"] = None
                out["note"] = "CPU quick mode: MFU and memory have no meaning here"
            log(
                f"  d: {variant}: {out['tokens_per_s']:.0f} tokens/s, step {step_s * 1e3:.1f} ms"
                + (f", MFU {out['mfu']:.3f}, peak {out['peak_memory_gib']:.1f} GiB" if cuda else "")
            )
        except Exception as e:  # noqa: BLE001
            out["error"] = error_text(e)
            log(traceback.format_exc())
            if cuda:
                torch.cuda.empty_cache()
        save()
    res["mfu_convention"] = (
        f"(6 * matmul params * tokens + 3 * 4 * D * Hq * attention pairs * layers) / step time / {PEAK_BF16_TFLOPS} TFLOP/s (dense bf16 datasheet peak); attention pairs: causal for causal_flash, allowed GEM pairs otherwise"
    )


# ---------------------------------------------------------------------------------------------
# Targets, markdown, orchestration
# ---------------------------------------------------------------------------------------------
def evaluate_targets(result: dict) -> dict:
    t = {}
    b = result.get("parts", {}).get("b", {})
    runs = b.get("runs", [])
    if not result.get("env", {}).get("gpu"):
        why = "not evaluated: no CUDA device (CPU figures are interpreter times)"
        return {name: {"status": why} for name in ("gem_fwd_bwd_vs_flex", "causal_fwd_vs_sdpa_flash", "train_step_vs_causal")}
    pairs = []
    for r in runs:
        if r["mask"].startswith("gem") and "fwd_bwd_ms" in r.get("triton", {}) and "fwd_bwd_ms" in r.get("flex", {}):
            pairs.append(
                {
                    "mask": r["mask"],
                    "L": r["L"],
                    "D": r["D"],
                    "triton_ms": r["triton"]["fwd_bwd_ms"],
                    "flex_ms": r["flex"]["fwd_bwd_ms"],
                    "flex_over_triton": r["flex"]["fwd_bwd_ms"] / r["triton"]["fwd_bwd_ms"],
                }
            )
    t["gem_fwd_bwd_vs_flex"] = {
        "goal": "triton fwd+bwd ms <= FlexAttention fwd+bwd ms on the same GEM mask",
        "status": ("met" if all(p["triton_ms"] <= p["flex_ms"] for p in pairs) else "missed") if pairs else "not measured",
        "measured": pairs,
    }
    pairs = []
    for r in runs:
        if r["mask"] == "causal" and "fwd_ms" in r.get("triton", {}) and "fwd_ms" in r.get("sdpa_flash", {}):
            pairs.append(
                {
                    "L": r["L"],
                    "D": r["D"],
                    "triton_ms": r["triton"]["fwd_ms"],
                    "sdpa_flash_ms": r["sdpa_flash"]["fwd_ms"],
                    "speed_vs_flash": r["sdpa_flash"]["fwd_ms"] / r["triton"]["fwd_ms"],
                }
            )
    t["causal_fwd_vs_sdpa_flash"] = {
        "goal": "triton dense-causal forward speed >= 0.9 x SDPA flash",
        "status": ("met" if all(p["speed_vs_flash"] >= 0.9 for p in pairs) else "missed") if pairs else "not measured",
        "measured": pairs,
    }
    v = result.get("parts", {}).get("d", {}).get("variants", {})
    tri, cau = v.get("gem_triton", {}), v.get("causal_flash", {})
    if "tokens_per_s" in tri and "tokens_per_s" in cau:
        ratio = tri["tokens_per_s"] / cau["tokens_per_s"]
        t["train_step_vs_causal"] = {"goal": "GEM triton step tokens/s >= 0.95 x plain causal", "status": "met" if ratio >= 0.95 else "missed", "ratio": ratio}
    else:
        t["train_step_vs_causal"] = {"goal": "GEM triton step tokens/s >= 0.95 x plain causal", "status": "not measured"}
    return t


def _f(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"
    return str(x)


def markdown(result: dict) -> str:
    env = result.get("env", {})
    lines = [
        "# GEM kernel GPU check (tools/gpu_check.py)",
        "",
        f"- date (UTC): {env.get('date_utc')}; device: {env.get('gpu') or 'CPU (no CUDA): interpreter, not a performance run'}"
        + (f" (sm {env.get('capability')}, {env.get('sm_count')} SMs, {env.get('gpu_memory_gib')} GiB)" if env.get("gpu") else ""),
        f"- versions: python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, transformers {env.get('transformers')}, numpy {env.get('numpy')}",
        f"- command: `{result.get('command')}`; quick: {result.get('quick')}; budget {result.get('time_budget_s')} s; wall {_f(result.get('wall_s'), 1)} s",
    ]
    if env.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {env['nvidia_smi']}")
    gm = result.get("gemm")
    if gm and "tflops" in gm:
        lines.append(f"- bf16 matmul 8192^3 on this card: {gm['tflops']:.0f} TFLOP/s (MFU uses the {PEAK_BF16_TFLOPS:.0f} TFLOP/s datasheet peak)")
    lines += ["", "## Targets", "", "| target | status | detail |", "|---|---|---|"]
    for name, t in result.get("targets", {}).items():
        detail = ""
        if t.get("measured"):
            key = "flex_over_triton" if name == "gem_fwd_bwd_vs_flex" else "speed_vs_flash"
            detail = "; ".join(f"{m.get('mask', 'causal')} L={m['L']} D={m['D']}: {m[key]:.2f}x" for m in t["measured"])
        elif "ratio" in t:
            detail = f"{t['ratio']:.3f}x"
        lines.append(f"| {t.get('goal', name)} | {t['status']} | {detail} |")
    lines += ["", "## Parts", "", "| part | status | seconds | budget s | error |", "|---|---|---|---|---|"]
    for p, r in result.get("parts", {}).items():
        lines.append(f"| {p} | {r.get('status')} | {_f(r.get('seconds'), 1)} | {_f(r.get('budget_s'), 1)} | {(r.get('error') or '')[:200]} |")
    a = result.get("parts", {}).get("a", {})
    if a.get("checks"):
        lines += [
            "",
            "## a. Correctness (error / bound, max abs vs the fp32 reference)",
            "",
            "| case | dtype | backend | out | dq | dk | dv | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in a["checks"]:
            cells = [f"{c[t]['err']:.2e} / {c[t]['bound']:.2e}" if t in c else "-" for t in ("out", "dq", "dk", "dv")]
            lines.append(
                f"| {c['case']} | {c['dtype']} | {c['backend']} | " + " | ".join(cells) + f" | {'yes' if c['ok'] else 'NO ' + c.get('error', '')[:80]} |"
            )
    b = result.get("parts", {}).get("b", {})
    if b.get("runs"):
        lines += [
            "",
            f"## b. Speed (bf16, B=1, Hq:Hkv {b.get('heads')}; ms medians; TFLOP/s on allowed pairs / on visited tiles)",
            "",
            "| mask | L | D | docs (GEM) | tiles visited / causal | table ms | backend | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | tiles fwd+bwd TFLOP/s | mask build ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["runs"]:
            head = f"| {r['mask']} | {r['L']} | {r['D']} | {r.get('documents', '-')} ({r.get('gem_documents', '-')}) | "
            head += f"{r.get('tiles_partial', 0) + r.get('tiles_full', 0)} / {r.get('tiles_causal', '-')} | {_f(r.get('block_table_build_ms'), 2)} | "
            for key in ("triton", "flex", "sdpa_flash", "sdpa_cudnn", "sdpa_math"):
                x = r.get(key)
                if x is None:
                    continue
                if "error" in x and "fwd_ms" not in x:
                    lines.append(head + f"{key} | error: {x['error'][:120]} | | | | | | | |")
                    continue
                lines.append(
                    head + f"{key} | {_f(x.get('fwd_ms'))} | {_f(x.get('bwd_ms'))} | {_f(x.get('fwd_bwd_ms'))} | {_f(x.get('fwd_tflops'), 1)} | "
                    f"{_f(x.get('fwd_bwd_tflops'), 1)} | {_f(x.get('fwd_bwd_tflops_tiles'), 1)} | {_f(x.get('block_mask_build_ms'), 2)} |"
                )
            if "error" in r:
                lines.append(head + f"error: {r['error'][:160]} | | | | | | | | |")
        if b.get("skipped"):
            lines.append("")
            lines.append("Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in b["skipped"]))
    c = result.get("parts", {}).get("c", {})
    if c.get("per_head_dim"):
        lines += ["", f"## c. Tuning (GEM mask, L={c.get('L')}, bf16; kernel ms = fwd + dK/dV + dQ)", ""]
        for D, r in c["per_head_dim"].items():
            if "best" in r:
                lines.append(
                    f"- D={D}: best {json.dumps(r['best']['config'])}: {r['best']['total_ms']:.3f} ms"
                    + (f" vs default {r['default_total_ms']:.3f} ms ({r['speedup_vs_default']:.2f}x)" if "default_total_ms" in r else "")
                    + f"; {len(r['candidates'])} candidates measured, {r.get('skipped', 0)} left for lack of time"
                )
            if "error" in r:
                lines.append(f"- D={D}: error {r['error'][:200]}")
        for rec in c.get("recommendation", []):
            lines.append(f"- change: {rec}")
    d = result.get("parts", {}).get("d", {})
    if d.get("variants"):
        lines += [
            "",
            f"## d. Training step ({d.get('model')}, {d.get('rows')} x {d.get('seq_len')} tokens, {d.get('documents')} documents)",
            "",
            "| variant | attention | tokens/s | step ms | MFU | peak GiB | first step s | loss finite |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, x in d["variants"].items():
            if "error" in x:
                lines.append(f"| {name} | {x.get('attention_backend')} | error: {x['error'][:150]} | | | | | |")
                continue
            lines.append(
                f"| {name} | {x.get('attention_backend')} {x.get('sdpa_backend', '')} | {_f(x.get('tokens_per_s'), 0)} | {_f(x.get('step_s', 0) * 1e3, 1)} | "
                f"{_f(x.get('mfu'))} | {_f(x.get('peak_memory_gib'), 1)} | {_f(x.get('first_step_s'), 1)} | {x.get('loss_finite')} |"
            )
    return "\n".join(lines) + "\n"


def summary(result: dict) -> dict:
    """The figures for the last stdout line (the full record is in the JSON file)."""
    s = {
        "json": result["files"]["json"],
        "markdown": result["files"]["markdown"],
        "gpu": result.get("env", {}).get("gpu"),
        "quick": result.get("quick"),
        "wall_s": result.get("wall_s"),
        "parts": {p: {"status": r.get("status"), "seconds": r.get("seconds")} for p, r in result.get("parts", {}).items()},
        "targets": {k: {kk: vv for kk, vv in v.items() if kk != "goal"} for k, v in result.get("targets", {}).items()},
    }
    a = result.get("parts", {}).get("a", {}).get("summary")
    if a:
        s["correctness"] = a
    b = result.get("parts", {}).get("b", {}).get("runs", [])
    s["speed_ms"] = {
        f"{r['mask']} L{r['L']} D{r['D']}": {
            k: round(r[k]["fwd_bwd_ms"], 4) for k in ("triton", "flex", "sdpa_flash", "sdpa_cudnn", "sdpa_math") if "fwd_bwd_ms" in r.get(k, {})
        }
        for r in b
    }
    c = result.get("parts", {}).get("c", {})
    if c.get("recommendation"):
        s["tuning"] = c["recommendation"]
    d = result.get("parts", {}).get("d", {}).get("variants", {})
    s["train"] = {
        k: {kk: (round(v[kk], 4) if isinstance(v.get(kk), float) else v.get(kk)) for kk in ("tokens_per_s", "mfu", "peak_memory_gib")}
        for k, v in d.items()
        if "tokens_per_s" in v
    }
    return s


def run_part_inprocess(part: str, args, budget_s: float) -> dict:
    """Run one part here; its results go to part_X.json as they come."""
    cuda = torch.cuda.is_available() and not args.cpu
    ctx = {"cuda": cuda, "device": "cuda" if cuda else "cpu", "quick": args.quick, "train_rows": args.train_rows}
    res = {"part": part, "status": "running", "budget_s": budget_s}
    path = os.path.join(args.output, f"part_{part}.json")
    clock = Clock(budget_s)

    def save():
        res["seconds"] = clock.elapsed()
        write_json(path, res)

    fn = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}[part]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--output", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out"))
    ap.add_argument(
        "--time-budget-s", type=float, default=None, help=f"wall-clock budget of all parts (default {DEFAULT_BUDGET_S:.0f}, quick {QUICK_BUDGET_S:.0f})"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU testing)")
    ap.add_argument("--cpu", action="store_true", help="ignore CUDA even if present (the interpreter path)")
    ap.add_argument("--no-isolate", action="store_true", help="run the parts in this process instead of one subprocess each")
    ap.add_argument("--train-rows", type=int, default=4, help="rows of 4096 tokens per training step (part d)")
    ap.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    global _LOG_FILE
    _LOG_FILE = os.path.join(args.output, "gpu_check.log")
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
    if os.path.exists(_LOG_FILE):
        os.remove(_LOG_FILE)
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
                        os.path.abspath(__file__),
                        "--_part",
                        p,
                        "--_budget",
                        str(part_budget),
                        "--output",
                        args.output,
                        "--train-rows",
                        str(args.train_rows),
                    ]
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
        s = summary(result)
        for rec in s.get("tuning", []):
            print(rec)
        print(json.dumps(s, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
