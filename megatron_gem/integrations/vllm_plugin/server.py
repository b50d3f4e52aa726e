"""Start and stop ``vllm serve`` of a GEM folder from another Python environment (the tests and
tools/bench_vllm_plugin.py run in .venv; vLLM in .venv-vllm): the plugin's command line in a
child process on 127.0.0.1, in a session of its own so that its engine processes stop with it.
Imports no vLLM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request


def start_vllm_server(python: str, folder: str, port: int, *args, env: dict | None = None, log_path: str, timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """``python -m megatron_gem.integrations.vllm_plugin serve FOLDER --host 127.0.0.1 --port
    PORT ARGS`` (``python``: the interpreter of vLLM's environment), output to ``log_path``;
    returns (process, base url) once /health answers. Raises RuntimeError with the log's tail
    when the server exits or does not answer within ``timeout`` seconds."""
    cmd = [python, "-m", "megatron_gem.integrations.vllm_plugin", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), *map(str, args)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop_vllm_server(proc)
    raise RuntimeError(f"vllm serve did not answer /health within {timeout} s:\n{log_tail(log_path)}")


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that no one holds now (the system's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, chars: int = 6000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def stop_vllm_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the server's process group (the API server, its engine and worker processes),
    SIGKILL if it has not ended in ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
