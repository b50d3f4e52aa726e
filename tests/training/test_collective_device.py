"""NCCL's device rule, on CPU: train.py's collectives must travel on the process group's
communication device (megatron_gem.common.distributed.comm_device), not on the device the
caller's tensors happen to be on.

On a GPU cluster NCCL refuses a host tensor ("No backend type associated with device type
cpu"), so a collective over the trainer's host-side bookkeeping (the exit handler's flag, the
NaN guard's flags, the step record, validation sums) crashes the run; gloo takes host tensors,
so no CPU run could see it. Here tests/hooks/nccl_rule/sitecustomize.py, loaded in every
process, declares gloo groups to communicate on a device that is not the CPU and makes the
project's collectives refuse any tensor not on it (docs/training.md, "Collectives").

One train.py run per engine, 2 processes (data parallel), with everything that communicates
on: --exit-signal-handler, validation (--eval-interval), GradCache (--contrastive-micro-
batch-size, keys gathered across ranks) and the NaN guard, made to fire by a NaN loss on rank
1 at the last step (tests/training/fault_train.py): the run must end with the guard's message
naming rank 1, and the hook must have checked the collectives of each of those call sites.
"""

import glob
import json
import os

import pytest

from tests.launch import FAULT_TRAIN, REPO, launch, read_metrics

HOOK = os.path.join(REPO, "tests", "hooks", "nccl_rule")

COMMON = {
    "--seq-length": 64,
    "--global-batch-size": 4,
    "--train-iters": 4,
    "--gem-contrastive-from-step": 2,
    "--gem-alpha": 0.5,
    "--contrastive-batch-size": 8,
    "--contrastive-micro-batch-size": 2,
    "--contrastive-max-length": 24,
    "--lr": 1e-3,
    "--contrastive-lr": 1e-3,
    "--log-interval": 1,
    "--save-interval": 2,
    "--split": "90,10,0",
    "--eval-interval": 2,
    "--eval-iters": 1,
    "--attention-backend": "sdpa",
    "--seed": 11,
    "--exit-signal-handler": True,
}
ENGINES = {
    "deepspeed": {"--micro-batch-size": 2},
    "megatron": {"--micro-batch-size": 1, "--tensor-model-parallel-size": 1},  # 2 processes: DP=2
}
# Call sites (the first project function outside common/distributed.py) whose collectives the
# hook must have checked, by the operation torch.distributed ran.
SITES = {
    ("all_reduce", "megatron_gem/training/process_setup.py:should_exit"),  # the exit signal handler
    ("all_reduce", "megatron_gem/training/guard.py:check_step"),  # the NaN guard
    ("all_reduce", "megatron_gem/training/step.py:step_record"),  # the metrics of a step
    ("all_reduce", "megatron_gem/training/run.py:train"),  # the global batch's NTP targets
    ("all_reduce", "megatron_gem/training/validation.py:__call__"),  # validation sums
    ("all_gather", "megatron_gem/training/validation.py:contrastive_sums"),  # validation's InfoNCE keys
    ("all_gather", "megatron_gem/gem/losses.py:info_nce"),  # training's InfoNCE keys (GradCache pass 1)
    ("all_reduce", "megatron_gem/training/grad_cache.py:embedding_grads"),  # their gradient (the gather's backward)
}


def _args(inputs, save, engine) -> list[str]:
    flags = {"--model": inputs["model"], "--data": inputs["data"], "--save": str(save), **COMMON, **ENGINES[engine]}
    out = ["--no-progress"]
    for k, v in flags.items():
        out += [k] if v is True else [k, str(v)]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_collectives_travel_on_the_groups_device(engine, tiny_inputs, tmp_path):
    save, reports = tmp_path / "run", tmp_path / "reports"
    env = {"PYTHONPATH": os.pathsep.join([HOOK, REPO]), "GEM_TEST_NCCL_RULE": str(reports), "MG_FAULT": "nan@4:1"}
    proc = launch(_args(tiny_inputs, save, engine), nproc=2, launcher="torchrun", script=FAULT_TRAIN, env=env, timeout=420)
    assert "[nccl rule]" not in proc.stdout, proc.stdout[-6000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("train.py: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout[-6000:]
    assert "step 4 (phase 2): non-finite loss on rank(s) 1," in errors[0]  # the guard's collective, both ranks

    ranks = []
    for path in sorted(glob.glob(str(reports / "rank*.json"))):
        with open(path) as f:
            ranks.append(json.load(f))
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]  # one training process per rank
    for r in ranks:
        assert r["rule_declared"] and not r["refused"]
        seen = {tuple(key.split(" ", 1)) for key in r["sites"]}
        assert SITES <= seen, sorted(SITES - seen)

    records = read_metrics(save)
    assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4]  # the bad step's figures are logged too
    assert [m["step"] for m in records if "valid_ntp_loss" in m] == [2]
    assert (save / "latest").read_text().strip() == "global_step2"
