"""Launch helpers of the training tests (train.py in subprocesses). A module of its own name:
test directories' conftest modules would shadow each other."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train.py")
FAULT_TRAIN = os.path.join(REPO, "tests", "training", "fault_train.py")


def base_args(inputs, save, **overrides):
    """train.py arguments of a short two-phase run on the tiny inputs."""
    args = {
        "--model": inputs["model"],
        "--data": inputs["data"],
        "--save": str(save),
        "--seq-length": 64,
        "--micro-batch-size": 4,
        "--global-batch-size": 4,
        "--contrastive-batch-size": 8,
        "--train-iters": 6,
        "--gem-contrastive-from-step": 3,
        "--gem-p-raw": 0.5,
        "--lr": 1e-3,
        "--contrastive-lr": 1e-3,
        "--log-interval": 1,
        "--save-interval": 3,
        "--seed": 11,
    }
    args.update(overrides)
    out = ["--no-progress"]
    for k, v in args.items():
        if v is None:
            continue
        out += [k] if v is True else [k, str(v)]
    return out


# A port range of our own per test process: parallel test runs (or other jobs) must not collide.
_port = [20000 + (os.getpid() * 37) % 20000]


def launch(args, *, nproc=1, launcher="python", timeout=240, script=TRAIN, env=None):
    """Run train.py (or ``script``, e.g. fault_train.py) in subprocess(es); returns
    CompletedProcess (stdout+stderr in .stdout). ``env``: extra environment variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore", **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    _port[0] += 7
    if launcher == "python":
        assert nproc == 1
        env.update(MASTER_PORT=str(_port[0]))
        cmd = [sys.executable, script, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_port[0]}", script, *args]
    elif launcher == "deepspeed":
        ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [ds, f"--num_gpus={nproc}", f"--master_port={_port[0]}", script, *args]
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_metrics(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
