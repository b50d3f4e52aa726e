"""Part "env": the machine (GPU, clocks, versions) and the card's own bf16 matmul rate."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import numpy as np
import torch

from .common import error_text


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
