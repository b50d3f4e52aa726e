"""`pip install .[deepspeed]` into a fresh virtual environment gives a package whose DeepSpeed
engine imports and whose train.py answers --help: what a cluster user's first install does.

Slow (a venv and a real install, a few minutes): marked ``install`` and run by
``make test-install`` (CI runs it after ``make test``), not by the main suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.install


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_deepspeed_extra_installs_imports_and_runs_train_help(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    constraints = os.path.join(REPO, "constraints.txt")
    # torch first, pinned: the same order the docs give a cluster user (their CUDA wheel there).
    _run([py, "-m", "pip", "install", "-q", "-c", constraints, "torch==2.13.0"])
    # A copy of the source tree without build leftovers: a non-editable install builds a wheel,
    # so what is checked is what the wheel carries (the kernels, the package data).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"), symlinks=True)
    _run([py, "-m", "pip", "install", "-q", "-c", constraints, f"{src}[deepspeed]"])
    # Run from a directory that holds no source: only the installed package can be imported.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(REPO, "train.py"), work / "train.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    probe = _run(
        [py, "-c", "import megatron_gem, deepspeed; from megatron_gem.training.deepspeed_engine import DeepSpeedEngine; print(megatron_gem.__file__)"],
        cwd=work,
        env=env,
    )
    assert str(venv) in probe.stdout, f"megatron_gem imported from outside the fresh venv: {probe.stdout}"
    helped = _run([py, "train.py", "--help"], cwd=work, env=env)
    assert "--deepspeed" in helped.stdout and "--gem-num-special-tokens" in helped.stdout
    # The kernels travel inside the wheel (megatron_gem.kernels), not through the source tree.
    _run([py, "-c", "from megatron_gem.kernels import build_block_table"], cwd=work, env=env)
