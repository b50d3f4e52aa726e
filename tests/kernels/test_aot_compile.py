"""Ahead-of-time compile of the three GEM kernels for sm_80 and sm_90 with Triton's real
compiler (no GPU needed): catches compile-only errors the interpreter cannot see, and keeps
the launcher's configs within shared memory and free of register spills.

Runs in a subprocess with TRITON_INTERPRET=0: conftest.py turns the interpreter on for this
process, and interpreted @triton.jit functions cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Max shared memory per block (opt-in): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MMA = {"sm_80": "mma.sync", "sm_90": "wgmma"}


def _toolchain_missing():
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(nvidia, "bin", tool)):
            return f"triton's nvidia backend ships no {tool}"
    return None


# suffix_sees_bos compiles a second specialisation of the same kernel: make test-long
@pytest.mark.parametrize("bos", [False, pytest.param(True, marks=pytest.mark.long)], ids=["default", "suffix_sees_bos"])
def test_aot_compile_sm80_sm90(bos):
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"NVIDIA toolchain absent: {missing}")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "megatron_gem.kernels.aot", "--json", "--quick", "--arch", "80", "90"]
    if bos:
        cmd.append("--suffix-sees-bos")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = {(r["arch"], r["kernel"], r["head_dim"]) for r in rows}
    assert seen == {(a, k, d) for a in ("sm_80", "sm_90") for k in ("fwd", "bwd_dkdv", "bwd_dq") for d in (64, 128)}
    for r in rows:
        where = f"{r['arch']} {r['kernel']} d{r['head_dim']}"
        assert r["suffix_sees_bos"] is bos
        assert 0 < r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], where
        assert 0 < r["registers"] <= 255, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local_bytes"] == 0, f"{where} spills: {r}"
        assert r["mma"] == MMA[r["arch"]], where
