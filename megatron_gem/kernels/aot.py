"""Ahead-of-time compile of the GEM kernels for NVIDIA targets, without a GPU.

    TRITON_INTERPRET=0 python -m megatron_gem.kernels.aot [--json] [--arch 80 90] [--quick]

For every (arch, dtype, head dim, tiling, warps, stages) config and each of the three kernels
(forward, backward dK/dV, backward dQ) this runs Triton's real compiler (TTIR -> TTGIR -> LLVM
-> PTX -> cubin with the ptxas shipped in Triton) and reports the shared memory Triton allocates
and the registers / spill (LOCAL) bytes that ``cuobjdump --dump-resource-usage`` reads from the
cubin. The signature mirrors a real launch on contiguous [B, H, L, D] tensors: 16-byte aligned
pointers, unit stride on the head dim, other strides multiples of 16, L unspecialised; the dK/dV
kernel's GQA group (a constexpr) is AOT_GROUP = 4.
Needs the real compiler: with TRITON_INTERPRET=1 ``triton.jit`` yields interpreter functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_POINTER_TYPES = {
    "LSE": "*fp32", "DELTA": "*fp32",
    "DOC": "*i32", "ROLE": "*i32",
    "KV_NUM": "*i32", "KV_IDX": "*i32", "FKV_NUM": "*i32", "FKV_IDX": "*i32",
    "Q_NUM": "*i32", "Q_IDX": "*i32", "FQ_NUM": "*i32", "FQ_IDX": "*i32",
}
_TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
# GQA group of the dK/dV kernel (a constexpr there): 4, as Llama-3 (32 query : 8 KV heads).
AOT_GROUP = 4

# (dtype, head_dim): each compiled with the launcher's own GPU choices (default_launch_config).
CONFIGS = [("fp16", 64), ("fp16", 128), ("bf16", 64), ("bf16", 128)]
QUICK_CONFIGS = CONFIGS[:2]


def _kernels():
    from . import gem_attention_triton as g

    return {"fwd": g._gem_attn_fwd_kernel, "bwd_dkdv": g._gem_attn_bwd_dkdv_kernel, "bwd_dq": g._gem_attn_bwd_dq_kernel}


def _signature(kernel, dtype: str, head_dim: int, block_m: int, block_n: int, sub_m: int, suffix_sees_bos: bool):
    """(signature, constexprs, attrs) for triton.compile, as a launch on contiguous tensors."""
    signature, constexprs, attrs = {}, {}, {}
    values = {
        "HEAD_DIM": head_dim, "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()), "BLOCK_M": block_m,
        "BLOCK_N": block_n, "SUB_M": sub_m, "SUFFIX_SEES_BOS": suffix_sees_bos, "INTERPRET": False, "PRECISION": "tf32",
        "GROUP": AOT_GROUP,
    }
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr:  # GROUP is one in dK/dV only
            signature[name], constexprs[name] = "constexpr", values[name]
        elif name in _TENSORS:
            signature[name], attrs[(i,)] = f"*{dtype}", [["tt.divisibility", 16]]
        elif name in _POINTER_TYPES:
            signature[name], attrs[(i,)] = _POINTER_TYPES[name], [["tt.divisibility", 16]]
        elif name == "sm_scale":
            signature[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1  # unit stride: what a launch specialises
        elif name.startswith("stride_"):
            signature[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local (spill) and static shared bytes of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(name)
    fields = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"no {key} in cuobjdump output:\n{out}")
        fields[key.lower()] = int(m.group(1))
    return fields


def ptxas_spills(ptx: str, arch: int) -> dict:
    """Spill stores / loads and stack frame bytes from ``ptxas -v`` on the kernel's PTX, run with
    the ptxas Triton itself uses for this arch and Triton's register-allocation flag."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m is None:
        raise RuntimeError(f"no spill figures in ptxas output:\n{log}")
    return {"stack_frame": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": int(m.group(3))}


def compile_one(kernel, arch: int, dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int, sub_m: int | None = None, suffix_sees_bos: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(kernel, dtype, head_dim, block_m, block_n, sub_m or block_m, suffix_sees_bos)
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    spills = ptxas_spills(ptx, arch)
    return {
        "shared_bytes": int(compiled.metadata.shared),
        "registers": usage["reg"],
        "local_bytes": usage["local"],
        "stack_bytes": usage["stack"],
        "spill_stores": spills["spill_stores"],
        "spill_loads": spills["spill_loads"],
        "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none"),
    }


def run(archs=(80, 90), configs=CONFIGS, suffix_sees_bos: bool = False, log=sys.stderr) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compile needs the real Triton compiler: unset TRITON_INTERPRET (or set it to 0)")
    import torch

    from .gem_attention_triton import default_launch_config

    rows = []
    for arch in archs:
        for dtype, d in configs:
            cfg = default_launch_config(d, torch.device("cuda"))
            for name, kernel in _kernels().items():
                warps, stages = cfg[name]
                sub_m = cfg["sub_m"] if name == "bwd_dkdv" else None
                row = {"arch": f"sm_{arch}", "kernel": name, "dtype": dtype, "head_dim": d, "suffix_sees_bos": suffix_sees_bos, "block_m": cfg["block_m"], "block_n": cfg["block_n"], "sub_m": sub_m or cfg["block_m"], "num_warps": warps, "num_stages": stages}
                row.update(compile_one(kernel, arch, dtype, d, cfg["block_m"], cfg["block_n"], warps, stages, sub_m=sub_m, suffix_sees_bos=suffix_sees_bos))
                print(" ".join(f"{k}={v}" for k, v in row.items()), file=log, flush=True)
                rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true", help="fp16 only")
    ap.add_argument("--suffix-sees-bos", action="store_true", help="compile the suffix_sees_bos variant")
    ap.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    args = ap.parse_args(argv)
    rows = run(tuple(args.arch), QUICK_CONFIGS if args.quick else CONFIGS, suffix_sees_bos=args.suffix_sees_bos)
    if args.json:
        print(json.dumps(rows))
    else:
        cols = ["arch", "kernel", "dtype", "head_dim", "block_m", "block_n", "sub_m", "num_warps", "num_stages", "shared_bytes", "registers", "stack_bytes", "spill_stores", "spill_loads", "mma"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
