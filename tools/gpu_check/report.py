"""The whole run's record read back: targets met / missed, the markdown tables, and the figures
of the last stdout line."""

from __future__ import annotations

import json

from .common import PEAK_BF16_TFLOPS


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
    lines += train_e2e_markdown(result.get("parts", {}).get("e", {}))
    return "\n".join(lines) + "\n"


def train_e2e_markdown(e: dict) -> list[str]:
    """Part e's table: one row per engine:mode, skipped ones with their reason."""
    if not (e.get("combos") or e.get("skipped")):
        return []
    fw = e.get("frameworks", {})
    lines = [
        "",
        f"## e. train.py end to end ({e.get('device')}, {e.get('backend')}; resume tolerance {e.get('tolerance')} relative)",
        "",
        f"- frameworks: already installed {fw.get('already_installed')}, installed from {fw.get('wheels_dir')}: {fw.get('installed') or 'nothing'}",
        "",
        "| engine:mode | ok | stop | reference s | stopped s | resumed s | metrics max rel diff | export max rel diff | bitwise | failed checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in e.get("combos", {}).items():
        if "error" in r:
            lines.append(f"| {name} | NO | error: {r['error'][:150]} | | | | | | | |")
            continue
        legs = [r["launches"].get(k, {}).get("seconds") for k in ("reference", "stopped", "resumed")]
        failed = [k for k, v in r.get("checks", {}).items() if not v]
        bitwise = r.get("metrics", {}).get("bitwise") and r.get("export", {}).get("bitwise")
        lines.append(
            f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('stop')} | " + " | ".join(_f(x, 1) for x in legs) + " | "
            f"{_f(r.get('metrics', {}).get('max_rel_diff'))} | {_f(r.get('export', {}).get('max_rel_diff'))} | {bitwise} | {', '.join(failed)} |"
        )
    for skip in e.get("skipped", []):
        lines.append(f"| {skip['combo']} | skipped: {skip['why'][:200]} | | | | | | | | |")
    return lines


def headline(result: dict) -> dict:
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
    e = result.get("parts", {}).get("e", {}).get("summary")
    if e:
        s["train_e2e"] = e
    return s
