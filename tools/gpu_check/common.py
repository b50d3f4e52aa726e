"""What every part of the GPU check shares: the budget clock, the log, JSON files, error text,
the timer (do_bench on CUDA, wall time in the interpreter) and the FLOP conventions."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Dense bf16 peak used for MFU: the H100/H200 SXM datasheet figure (.library/device/H200.md:
# "dense bf16 about 990 TFLOP/s"). Part "env" also measures a bf16 matmul on the card itself.
PEAK_BF16_TFLOPS = 989.0


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


def set_log_file(path: str | None) -> None:
    """Where ``log`` also appends its lines (gpu_check.log in the output folder)."""
    global _LOG_FILE
    _LOG_FILE = path


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


def attention_flops(D: int, Hq: int, pairs: int) -> int:
    """Forward FLOPs: two matmuls (QK^T, PV) of 2 * D each per (query, key) pair and head."""
    return 4 * D * Hq * pairs


# Backward = 2.5 x forward (FlashAttention's convention: 5 matmuls against 2). The GEM kernel's
# two-pass backward recomputes QK^T in both passes (7 matmuls); TFLOP/s use the convention.
BWD_FACTOR = 2.5
