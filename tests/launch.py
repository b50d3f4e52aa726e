"""The one launch helper of the test suite: train.py, the tools and the workers run as
subprocesses (each gets fresh process groups; megatron-core's parallel state and the CPU shims
never touch the pytest process). Imported as ``tests.launch`` (pyproject's pytest
``pythonpath`` puts the repository root on the path; nothing here edits sys.path)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys

from megatron_gem.common.distributed import LAUNCHER_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
FAULT_TRAIN = os.path.join(REPO, "tests", "training", "fault_train.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
# Ports of our own per test process: parallel test runs (or other jobs) must not collide, and
# a port still held by a finished job is skipped.
_ports = itertools.count(20000 + (os.getpid() * 37) % 20000)


def free_port() -> int:
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def subprocess_env(**extra) -> dict:
    # Without the launcher variables an in-process test (main() in pytest) may have set: a child
    # starts like a command in a fresh shell, rendezvous on its own port.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def launch(args, *, nproc=1, launcher="python", timeout=240, script=TRAIN, env=None) -> subprocess.CompletedProcess:
    """Run train.py (or ``script``, e.g. fault_train.py) with ``launcher`` (python | torchrun |
    deepspeed); returns the CompletedProcess with stdout+stderr in ``.stdout``."""
    port = free_port()
    if launcher == "python":
        assert nproc == 1
        env = {"MASTER_PORT": str(port), **(env or {})}
        cmd = [sys.executable, script, *args]
    elif launcher == "torchrun":
        cmd = [TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={port}", script, *args]
    elif launcher == "deepspeed":
        cmd = [DEEPSPEED, f"--num_gpus={nproc}", f"--master_port={port}", script, *args]
    else:
        raise ValueError(launcher)
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore", **(env or {}))
    env.pop("TRITON_INTERPRET", None)  # train.py trains; only the pytest process runs kernels in the interpreter
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _checked(proc: subprocess.CompletedProcess, what) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{(proc.stderr or '')[-6000:]}")
    return proc


def run_torchrun(script_args, nproc: int = 1, timeout: int = 240, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun SCRIPT ARGS...; stdout and stderr apart (megatron tests read both)."""
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", *script_args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    return _checked(proc, " ".join(cmd)) if check else proc


def run_python(args, timeout: int = 240, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    return _checked(proc, args) if check else proc


def load_tool(name: str):
    """tools/NAME.py as a module (the thin command-line tools are callable in-process), loaded
    by path."""
    path = os.path.join(REPO, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_args(inputs, save, **overrides) -> list[str]:
    """train.py arguments of a short two-phase DeepSpeed run on the tiny inputs."""
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


def read_metrics(save) -> list[dict]:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# vLLM in its own environment (make vllm-venv; docs/vllm.md).
VLLM_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")


def start_vllm(folder, *args, timeout: float = 900):
    """``vllm serve`` of a GEM folder (the plugin's command line, in .venv-vllm) on 127.0.0.1,
    waited on until /health answers: (process, base url, log path); stop it with
    ``stop_vllm_server``. vLLM's CPU build starts in 1-4 minutes on two busy cores."""
    import tempfile

    from megatron_gem.integrations.vllm_plugin.server import start_vllm_server

    log = tempfile.NamedTemporaryFile(suffix=".vllm.log", delete=False).name
    # No usage reports (no network here); a 1 GiB KV cache (vLLM's CPU default takes GBs).
    env = subprocess_env(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    try:
        proc, url = start_vllm_server(VLLM_PYTHON, folder, free_port(), *args, env=env, log_path=log, timeout=timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
    return proc, url, log


def start_server(model_dir, *args, env: dict | None = None, timeout: float = 240):
    """``python -m megatron_gem.serve MODEL_DIR --port P ARGS`` in the background (a
    megatron_gem.serve.process.ServerProcess), waited on until /health answers; stop it with
    ``.stop()``, read its output with ``.output()``."""
    from megatron_gem.serve.process import ServerProcess

    return ServerProcess(
        model_dir, *args, port=free_port(), env=subprocess_env(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **(env or {})), timeout=timeout, cwd=REPO
    )


def exit_worker() -> None:
    """The end of a multi-process test worker that succeeded, as train.py ends
    (training/main.py exit_process): every rank past its last collective, the groups torn
    down, the streams flushed, then os._exit, so interpreter finalisation cannot abort a
    finished worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    import atexit

    atexit._run_exitfuncs()  # multiprocessing's children (megatron-core's checkpoint writers) end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
