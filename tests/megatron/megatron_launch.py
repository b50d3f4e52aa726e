"""Launch helpers of the megatron-core tests: every megatron process runs as a torchrun
subprocess (megatron-core's parallel state and the CPU shims must not touch the pytest
process). A module of its own name: test directories' conftest modules would shadow each other."""

import itertools
import os
import socket
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the thin command-line tools, callable in-process
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
_ports = itertools.count(29700 + (os.getpid() % 50) * 20)


def free_port() -> int:
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def run_torchrun(script_args, nproc: int = 1, timeout: int = 240, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false", **(env or {}))
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", *script_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_python(args, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


