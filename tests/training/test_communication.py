"""The communication arithmetic of training/recipes.py (communication_bytes) against the
collectives a real 2-process DeepSpeed ZeRO run on CPU (gloo) makes in one steady-state step
with 2 micro-batches (tests/training/comm_worker.py hooks torch.distributed and counts the
payload bytes by kind)."""

import json
import subprocess

import pytest

from tests.launch import REPO, TORCHRUN, free_port, subprocess_env


def counted(stage: int, accumulation: int) -> dict:
    env = subprocess_env(PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    cmd = [TORCHRUN, "--nproc-per-node=2", f"--master-port={free_port()}", "tests/training/comm_worker.py", str(stage), str(accumulation)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


# make test keeps ZeRO-1 (gradients all-reduced, as DeepSpeed does for stages 1-2) and ZeRO-3
# (parameters gathered per micro-batch); ZeRO-0 and ZeRO-2 are make test-long (docs/testing.md).
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.long), 1, pytest.param(2, marks=pytest.mark.long), 3])
def test_communication_arithmetic_matches_counted_collectives(stage):
    from megatron_gem.training.memory_estimate import Layout
    from megatron_gem.training.recipes import communication_bytes

    run = counted(stage, accumulation=2)
    got = run["counted"]
    want = communication_bytes(
        total=run["params"],
        trainable=run["params"],
        layout=Layout(zero_stage=stage, dp=2),
        micro_batches=2,
        weight_bytes=4,  # fp32 on CPU
    )
    print(f"ZeRO-{stage}: counted {dict(got)}, arithmetic {want}")
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        # a few scalars (the gradient norm, the overflow flag) ride along: 1 KB of slack
        assert got.get(kind, 0) == pytest.approx(want[kind], abs=1024), kind
