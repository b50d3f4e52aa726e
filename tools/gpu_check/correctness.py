"""Part a: correctness of the Triton kernel, sdpa and flex against the fp32 reference of the
kernel tests, outputs and gradients, bf16 and fp16, several layouts."""

from __future__ import annotations

import time
import traceback

import torch

from .common import Clock, error_text, log
from .workload import document_lengths, make_mask

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
    from megatron_gem.kernels.reference import PRECISION, error_report, make_inputs, random_batch, reference_attention, run_with_grads

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
