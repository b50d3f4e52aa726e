"""Part e: train.py end to end, one process through torchrun, on this machine's GPU with NCCL
(on CPU with gloo: the same code path), both engines and both modes, with everything that
communicates on: --exit-signal-handler, the NaN guard, validation, checkpoints, an exact resume.

Per combination (engine x --gem-train mode), three launches of one short run (a tiny Llama
and sentences written here by megatron_gem.testing; fp32, sdpa attention, 6 steps, phase 2
from step 4 with GradCache chunks, validation after steps 3 and 6, a checkpoint every 2 steps):

    reference  the run, uninterrupted;
    stopped    the same command through tests/training/fault_train.py: in full mode a NaN loss
               at step 5 (the guard stops every rank before saving: latest stays global_step4),
               in summary mode SIGUSR1 at step 3 (the exit handler saves global_step3, exits 0);
    resumed    the same command with --load: the steps after the checkpoint.

The resumed run must give the reference's metrics step by step (relative difference <= TOL,
"bitwise" when identical) and its HF export's tensors (the whole model in full mode, the
adapter in summary mode).

The device machine lacks deepspeed and megatron-core and has no network: their wheels travel
in the working tree (--wheels, default $GPU_CHECK_WHEELS or gpu_wheels/ at the repository root;
untracked, not ignored, so they travel) and are installed here with pip --no-index --no-deps
into a temporary folder put on the runs' PYTHONPATH. An engine whose framework is neither
installed nor brought is skipped with the reason recorded. docs/kernel.md says how to fetch the
wheels. This module imports neither framework itself (train.py's processes do).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from .common import REPO, Clock, error_text, log

WHEELS_ENV = "GPU_CHECK_WHEELS"
DEFAULT_WHEELS = os.path.join(REPO, "gpu_wheels")
FRAMEWORKS = {"deepspeed": "deepspeed", "megatron": "megatron.core"}  # engine -> what train.py imports
COMBOS = ("deepspeed:full", "megatron:full", "deepspeed:summary", "megatron:summary")  # both engines first
TRAIN = os.path.join(REPO, "train.py")
FAULT_TRAIN = os.path.join(REPO, "tests", "training", "fault_train.py")
TRAIN_ITERS = 6
TOL = 1e-5  # relative; fp32, the same kernels before and after the resume
VOLATILE = ("tokens_per_s", "step_time_s")
# How each mode's second launch stops, and the checkpoint the third resumes from.
STOPS = {"full": {"fault": "nan@5:0", "resume_from": 4}, "summary": {"fault": "signal@3:0", "resume_from": 3}}
ENGINE_ARGS = {
    "deepspeed": ["--micro-batch-size", "2", "--deepspeed", os.path.join(REPO, "ds_zero3.json")],
    "megatron": ["--micro-batch-size", "1", "--tensor-model-parallel-size", "1"],
}
MODE_ARGS = {"full": [], "summary": ["--gem-train", "summary", "--gem-adapter-rank", "4"]}
FETCH_HINT = "fetch them as docs/kernel.md says ('Wheels for part e')"


def run_args(model: str, data: str, save: str, engine: str, mode: str) -> list[str]:
    """train.py's arguments of one combination's run."""
    return [
        "--model", model, "--data", data, "--save", save,
        "--seq-length", "64", "--global-batch-size", "4", "--train-iters", str(TRAIN_ITERS),
        "--gem-contrastive-from-step", "3", "--gem-alpha", "0.5",
        "--contrastive-batch-size", "8", "--contrastive-micro-batch-size", "2", "--contrastive-max-length", "24",
        "--lr", "1e-3", "--contrastive-lr", "1e-3", "--log-interval", "1", "--save-interval", "2",
        "--split", "90,10,0", "--eval-interval", "3", "--eval-iters", "1",
        "--attention-backend", "sdpa", "--seed", "11", "--exit-signal-handler", "--no-progress",
        *ENGINE_ARGS[engine], *MODE_ARGS[mode],
    ]  # fmt: skip


# ----------------------------------------------------------------------------- the frameworks
def base_env(cuda: bool) -> dict:
    """The environment of train.py's processes: offline, no launcher variables of ours, no
    Triton interpreter (train.py trains); CUDA hidden when the check runs on the CPU path."""
    from megatron_gem.common.distributed import LAUNCHER_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and k != "TRITON_INTERPRET"}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def import_error(module: str, env: dict) -> str | None:
    """None when ``module`` imports in a fresh interpreter with ``env``, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def wheel_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.whl")) + glob.glob(os.path.join(folder, "*.tar.gz")))


def install_wheels(files: list[str], target: str) -> None:
    """pip install ``files`` into ``target`` offline, without dependencies (each one needed is a
    file of its own in the folder); an sdist is built without isolation (setuptools is there)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile", "--target", target, *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install from the wheels failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")


def provide_frameworks(engines: list[str], wheels: str, env: dict, *, importable=import_error) -> tuple[dict, dict]:
    """(the runs' environment, a record): each engine's framework as found, or installed from
    ``wheels``; ``record["unavailable"][engine]`` says why an engine cannot run."""
    record = {"wheels_dir": wheels, "installed": [], "unavailable": {}, "already_installed": []}
    missing = {}
    for engine in engines:
        err = importable(FRAMEWORKS[engine], env)
        if err is None:
            record["already_installed"].append(engine)
        else:
            missing[engine] = err
    if not missing:
        return env, record
    files = wheel_files(wheels)
    if not files:
        for engine, err in missing.items():
            record["unavailable"][engine] = f"{FRAMEWORKS[engine]} is not importable ({err}) and {wheels} holds no wheels: {FETCH_HINT}"
        return env, record
    target = tempfile.mkdtemp(prefix="gpu_check_site_")
    try:
        install_wheels(files, target)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        for engine in missing:
            record["unavailable"][engine] = f"{FRAMEWORKS[engine]} is not importable and {error_text(e)}"
        return env, record
    record["installed"] = [os.path.basename(f) for f in files]
    record["site"] = target
    env = dict(env, PYTHONPATH=os.pathsep.join([target, env["PYTHONPATH"]]))
    for engine in missing:
        err = importable(FRAMEWORKS[engine], env)
        if err is not None:
            record["unavailable"][engine] = (
                f"{FRAMEWORKS[engine]} still not importable after installing {wheels}: {err} (a dependency's wheel missing? {FETCH_HINT})"
            )
    return env, record


# ----------------------------------------------------------------------------- one combination
def launch(args: list[str], env: dict, *, fault: str | None = None, timeout: float) -> dict:
    """train.py (or fault_train.py with MG_FAULT=``fault``) through torchrun, one process."""
    script = FAULT_TRAIN if fault else TRAIN
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", script, *args]
    env = dict(env, MG_FAULT=fault) if fault else env
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:  # its captured output comes as bytes
        rc, out = f"killed after {timeout:.0f} s", (e.stdout or b"").decode(errors="replace")
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "output": out}


def read_records(save: str) -> tuple[dict, dict]:
    """metrics.jsonl of a run: (training records, validation records), by step."""
    train, valid = {}, {}
    path = os.path.join(save, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "loss" in r:
                    train[r["step"]] = r
                elif "valid_ntp_loss" in r:
                    valid[r["step"]] = r
    return train, valid


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare_records(ref: dict, got: dict, steps) -> dict:
    """Largest relative difference of the numeric fields of ``steps`` (times excluded)."""
    worst, where, missing = 0.0, None, [s for s in steps if s not in ref or s not in got]
    for s in steps:
        if s in missing:
            continue
        for k, v in ref[s].items():
            w = got[s].get(k)
            if k in VOLATILE or isinstance(v, str):
                continue
            if v is None or w is None:
                d = 0.0 if v is w else float("inf")
            else:
                d = _rel(float(v), float(w))
            if d > worst:
                worst, where = d, f"step {s} {k}: {v} vs {w}"
    return {"steps": list(steps), "missing": missing, "max_rel_diff": worst, "worst": where, "bitwise": worst == 0.0 and not missing}


def compare_exports(ref_dir: str, got_dir: str) -> dict:
    """The tensors of two HF exports (every *.safetensors below them): relative to each tensor's
    largest magnitude."""
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(glob.glob(os.path.join(d, "**", "*.safetensors"), recursive=True)):
            prefix = os.path.relpath(f, d)
            out.update({f"{prefix}:{k}": v for k, v in load_file(f).items()})
        return out

    a, b = tensors(ref_dir), tensors(got_dir)
    if not a or sorted(a) != sorted(b):
        return {
            "tensors": len(a),
            "max_rel_diff": float("inf"),
            "worst": f"different tensors: {sorted(set(a) ^ set(b))[:4] or 'none exported'}",
            "bitwise": False,
        }
    worst, where = 0.0, None
    for k in a:
        scale = float(a[k].float().abs().max()) or 1.0
        d = float((a[k].float() - b[k].float()).abs().max()) / scale
        if d > worst:
            worst, where = d, k
    return {"tensors": len(a), "max_rel_diff": worst, "worst": where, "bitwise": worst == 0.0}


def _latest(save: str) -> str | None:
    path = os.path.join(save, "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def run_combo(engine: str, mode: str, inputs: dict, work: str, env: dict, clock: Clock) -> dict:
    """The three launches of one combination and their checks; ``ok`` when all hold."""
    stop = STOPS[mode]
    k = stop["resume_from"]
    out = {"engine": engine, "mode": mode, "stop": stop["fault"], "resume_from": k, "launches": {}, "checks": {}}
    ref_dir, run_dir = os.path.join(work, f"{engine}-{mode}-reference"), os.path.join(work, f"{engine}-{mode}-resumed")
    legs = [
        ("reference", ref_dir, None, []),
        ("stopped", run_dir, stop["fault"], []),
        ("resumed", run_dir, None, ["--load", run_dir]),
    ]
    outputs = {}
    for name, save, fault, extra in legs:
        if clock.out(reserve_s=5):
            out["launches"][name] = {"skipped": "part time budget spent"}
            out["ok"] = False
            return out
        r = launch(run_args(inputs["model"], inputs["data"], save, engine, mode) + extra, env, fault=fault, timeout=max(60.0, clock.left()))
        outputs[name] = r.pop("output")
        r["latest"] = _latest(save)
        out["launches"][name] = r
        log(f"  e: {engine}:{mode} {name}: rc {r['rc']} in {r['seconds']} s")
    c = out["checks"]
    ref_train, ref_valid = read_records(ref_dir)
    c["reference_ran"] = out["launches"]["reference"]["rc"] == 0 and sorted(ref_train) == list(range(1, TRAIN_ITERS + 1)) and sorted(ref_valid) == [3, 6]
    if mode == "full":  # the guard: every rank stopped before saving step 5
        c["stopped_as_expected"] = out["launches"]["stopped"]["rc"] == 1 and "step 5 (phase 2): non-finite loss on rank(s) 0," in outputs["stopped"]
    else:  # the exit handler: step 3 saved, exit 0
        c["stopped_as_expected"] = out["launches"]["stopped"]["rc"] == 0 and "SIGUSR1: saved step 3" in outputs["stopped"]
    c["stopped_at_checkpoint"] = out["launches"]["stopped"]["latest"] == f"global_step{k}"
    c["resumed_from_checkpoint"] = out["launches"]["resumed"]["rc"] == 0 and f"steps {k}->{TRAIN_ITERS}" in outputs["resumed"]
    got_train, got_valid = read_records(run_dir)
    out["metrics"] = compare_records(ref_train, got_train, range(1, TRAIN_ITERS + 1))
    out["validation"] = compare_records(ref_valid, got_valid, [TRAIN_ITERS])
    out["export"] = compare_exports(os.path.join(ref_dir, "hf"), os.path.join(run_dir, "hf"))
    c["metrics_equal"] = not out["metrics"]["missing"] and out["metrics"]["max_rel_diff"] <= TOL
    c["validation_equal"] = not out["validation"]["missing"] and out["validation"]["max_rel_diff"] <= TOL
    c["export_equal"] = out["export"]["max_rel_diff"] <= TOL
    out["ok"] = all(c.values())
    if not out["ok"]:  # what went wrong, for the reader of part_e.json: error lines and the end
        out["outputs"] = {
            name: {"errors": [line for line in text.splitlines() if "Error" in line or "error:" in line][:20], "tail": text[-2000:]}
            for name, text in outputs.items()
        }
    return out


def write_inputs(work: str) -> dict:
    """A tiny HF Llama whose tokenizer has unused reserved tokens (summary mode takes one as its
    summary token, as on Llama-3) and a corpus of generated sentences; nothing is downloaded."""
    from megatron_gem.testing import sample_sentences, save_tiny_reserved_base

    model = save_tiny_reserved_base(os.path.join(work, "model"))
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        for s in sample_sentences(300, seed=5):
            f.write(json.dumps({"text": s}) + "\n")
    return {"model": str(model), "data": data}


def part_e(ctx: dict, clock: Clock, res: dict, save) -> None:
    cuda = ctx["cuda"]
    combos = [c.strip() for c in (ctx.get("train_combos") or ",".join(COMBOS)).split(",") if c.strip()]
    bad = [c for c in combos if c not in COMBOS]
    if bad:
        raise ValueError(f"--train-combos {','.join(bad)}: choose from {','.join(COMBOS)}")
    wheels = ctx.get("wheels") or os.environ.get(WHEELS_ENV) or DEFAULT_WHEELS
    res.update(
        device="cuda" if cuda else "cpu",
        backend="nccl (train.py's choice on CUDA)" if cuda else "gloo (train.py's choice without CUDA)",
        gpus=torch.cuda.device_count() if cuda else 0,
        combos={},
        skipped=[],
        tolerance=TOL,
        train_iters=TRAIN_ITERS,
    )
    engines = sorted({c.split(":")[0] for c in combos})
    env, res["frameworks"] = provide_frameworks(engines, wheels, base_env(cuda))
    log(f"  e: frameworks {json.dumps({k: v for k, v in res['frameworks'].items() if k != 'site'})}")
    save()
    work = tempfile.mkdtemp(prefix="gpu_check_train_")
    try:
        inputs = write_inputs(work)
        for combo in combos:
            engine, mode = combo.split(":")
            why = res["frameworks"]["unavailable"].get(engine)
            if why is None and clock.out(reserve_s=10):
                why = "part time budget spent"
            if why is not None:
                res["skipped"].append({"combo": combo, "why": why})
                continue
            try:
                res["combos"][combo] = run_combo(engine, mode, inputs, work, env, clock)
            except Exception as e:  # noqa: BLE001
                res["combos"][combo] = {"ok": False, "error": error_text(e)}
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if res["frameworks"].get("site"):
            shutil.rmtree(res["frameworks"]["site"], ignore_errors=True)
    done = res["combos"]
    res["summary"] = {
        "combos_ok": sorted(c for c, r in done.items() if r.get("ok")),
        "combos_failed": sorted(c for c, r in done.items() if not r.get("ok")),
        "combos_skipped": [s["combo"] for s in res["skipped"]],
        "all_ok": bool(done) and all(r.get("ok") for r in done.values()) and not res["skipped"],
        "bitwise": sorted(c for c, r in done.items() if r.get("metrics", {}).get("bitwise") and r.get("export", {}).get("bitwise")),
    }
