"""The sbatch scripts' configuration handling, run with bash and no cluster: stand-ins for srun
and scontrol (first on PATH) record what the job would launch. The real-cluster behaviour is
test_slurm_cluster.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gem.training import recipes as R

ROOT = Path(__file__).resolve().parents[2]
WRAPPERS = ("gem_llama1b.sh", "gem_llama3b.sh", "gem_llama8b.sh")


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH directory whose srun writes its arguments to srun.args and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return tmp_path


def run_script(name: str, fake_slurm: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) and k not in ("MODEL", "DATA", "SAVE")}
    base.update(
        PATH=f"{fake_slurm / 'bin'}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node1",
        GEM_ROOT=str(ROOT),
        CPU="1",
        PYTHON=sys.executable,
        MASTER_ADDR="127.0.0.1",
        DATA=str(fake_slurm / "data.jsonl"),
        SAVE=str(fake_slurm / "save"),
    )
    base.update(env)
    return subprocess.run(["bash", str(ROOT / "slurm" / name)], env=base, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", WRAPPERS + ("gem_train.sh",))
def test_model_must_be_given(name, fake_slurm):
    proc = run_script(name, fake_slurm)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("[gem_train] error: MODEL is not set: give the checkpoint to train"), line
    if name != "gem_train.sh":
        assert f"slurm/{name})" in line  # the recipe is named
    assert not (fake_slurm / "save").exists() and not (fake_slurm / "srun.args").exists()  # nothing started


def test_recipe_defaults_reach_train_py(fake_slurm):
    proc = run_script("gem_llama8b.sh", fake_slurm, MODEL=str(fake_slurm / "model"))
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    args = (fake_slurm / "srun.args").read_text().splitlines()
    flags = dict(zip(args, args[1:]))
    assert flags["--model"] == str(fake_slurm / "model") and flags["--load"] == str(fake_slurm / "save")
    assert flags["--deepspeed"].endswith("configs/deepspeed/ds_zero1.json") and flags["--micro-batch-size"] == "2"  # the estimator's choice
    assert flags["--distributed-timeout-minutes"] == "30" and flags["--save-total-limit"] == "2" and flags["--save-interval"] == "100"
    assert flags["--contrastive-micro-batch-size"] == str(R.RECIPES["paper-llama3-8b"].contrastive_micro_batch_size)  # phase 2's GradCache chunk
    # the environment still overrides a recipe default
    run_script("gem_llama8b.sh", fake_slurm, MODEL="m", DISTRIBUTED_TIMEOUT_MINUTES="60", SAVE_TOTAL_LIMIT="5", DATA_CACHE_PATH="/shared/cache")
    args = (fake_slurm / "srun.args").read_text().splitlines()
    flags = dict(zip(args, args[1:]))
    assert (flags["--distributed-timeout-minutes"], flags["--save-total-limit"], flags["--data-cache-path"]) == ("60", "5", "/shared/cache")
