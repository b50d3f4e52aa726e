"""tools/gpu_check.py part e (train.py end to end) on CPU: the code path a lent GPU runs with
NCCL, here with gloo (train.py picks the backend by the device).

One combination runs through the tool as the device would run it (three train.py launches:
reference, stopped by a pre-emption signal, resumed); the rest is the part's pieces: the
frameworks from a folder of wheels (a real wheel built here, installed offline), the reason
recorded when neither is there, and comparisons that do catch a difference."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from tools.gpu_check import train_e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")


# long (make test-long): three train.py launches through the tool; train.py's own stop-and-resume
# exactness is make test's (test_deepspeed_engine, test_summary_mode), this is the tool's wrapper.
@pytest.mark.long
@pytest.mark.multiprocess
def test_part_e_runs_train_py_stops_and_resumes_exactly_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, TOOL, "--cpu", "--parts", "e", "--train-combos", "deepspeed:summary", "--time-budget-s", "600", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["train_e2e"]["all_ok"] and last["train_e2e"]["combos_ok"] == ["deepspeed:summary"], last
    e = json.loads((out / "part_e.json").read_text())
    assert e["status"] == "ok" and e["device"] == "cpu" and e["frameworks"]["already_installed"] == ["deepspeed"]
    r = e["combos"]["deepspeed:summary"]
    assert r["ok"] and all(r["checks"].values()), r
    assert [r["launches"][k]["rc"] for k in ("reference", "stopped", "resumed")] == [0, 0, 0]
    assert r["launches"]["stopped"]["latest"] == "global_step3"  # SIGUSR1 at step 3: saved there, exited 0
    assert r["export"]["tensors"] > 0 and r["metrics"]["steps"] == list(range(1, train_e2e.TRAIN_ITERS + 1))
    assert "## e. train.py end to end (cpu, gloo" in (out / "gpu_check.md").read_text()


def _wheel(folder, name="gemfakepkg", version="0.1") -> str:
    """A minimal pure-Python wheel of module ``name`` (VALUE = 7)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"])
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


def test_frameworks_come_from_the_wheels_folder_or_the_reason_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(train_e2e, "FRAMEWORKS", {"deepspeed": "gemfakepkg"})
    env = train_e2e.base_env(cuda=False)
    empty = tmp_path / "none"
    empty.mkdir()
    _, record = train_e2e.provide_frameworks(["deepspeed"], str(empty), env)
    why = record["unavailable"]["deepspeed"]
    assert "gemfakepkg is not importable (ModuleNotFoundError" in why and f"{empty} holds no wheels" in why and "docs/kernel.md" in why

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(str(wheels))
    env2, record = train_e2e.provide_frameworks(["deepspeed"], str(wheels), env)
    try:
        assert record["unavailable"] == {} and record["installed"] == ["gemfakepkg-0.1-py3-none-any.whl"]
        check = subprocess.run([sys.executable, "-c", "import gemfakepkg; print(gemfakepkg.VALUE)"], env=env2, capture_output=True, text=True, timeout=120)
        assert check.stdout.strip() == "7", check.stderr
    finally:
        import shutil

        shutil.rmtree(record.get("site", ""), ignore_errors=True)


def test_the_comparisons_see_a_difference(tmp_path):
    ref = {1: {"step": 1, "loss": 2.0, "grad_norm": 1.0, "step_time_s": 0.3}, 2: {"step": 2, "loss": 1.5, "grad_norm": None, "step_time_s": 0.2}}
    same = {1: dict(ref[1], step_time_s=9.0), 2: dict(ref[2])}
    assert train_e2e.compare_records(ref, same, [1, 2])["bitwise"]  # times differ, figures not
    off = {1: dict(ref[1]), 2: dict(ref[2], loss=1.5 * (1 + 1e-4))}
    c = train_e2e.compare_records(ref, off, [1, 2])
    assert c["max_rel_diff"] > train_e2e.TOL and c["worst"].startswith("step 2 loss")
    assert train_e2e.compare_records(ref, {1: ref[1]}, [1, 2])["missing"] == [2]

    from safetensors.torch import save_file

    for name, w in (("a", torch.ones(3)), ("b", torch.ones(3)), ("c", torch.tensor([1.0, 1.0, 1.001]))):
        (tmp_path / name).mkdir()
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    assert train_e2e.compare_exports(str(tmp_path / "a"), str(tmp_path / "b"))["bitwise"]
    assert train_e2e.compare_exports(str(tmp_path / "a"), str(tmp_path / "c"))["max_rel_diff"] == pytest.approx(1e-3, rel=1e-3)
