"""How train.py's process ends (training/main.py exit_process): after a run that held process
groups it leaves with os._exit (interpreter finalisation could abort a finished run, see
exit_process), so what it printed must be flushed first, its daemonic children ended (their
inherited pipes would hold a launcher waiting) and its exit code must survive."""

import subprocess
import sys

import pytest

from tests.launch import REPO, free_port, subprocess_env

SCRIPT = """
import multiprocessing
import sys
import time
import torch.distributed as dist
from megatron_gem.training import main
from megatron_gem.training.run import Engine
if {group}:
    dist.init_process_group("gloo", rank=0, world_size=1)
# A daemonic child holding the inherited stdout (as megatron-core's checkpoint writers do): the
# exit must end it, or the caller's pipe never closes.
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=True)
child.start()
main.shutdown(Engine())  # what main() does last, on success and on input errors alike
assert not dist.is_initialized()
print("[megatron-gem] done: last words, no newline", end="")  # a pipe: block-buffered, unflushed
print("and on stderr", end="", file=sys.stderr)
main.exit_process({code})
"""


@pytest.mark.parametrize("group,code", [(True, 0), (True, 2), (False, 2)], ids=["group-done", "group-input-error", "no-group"])
def test_exit_keeps_the_last_output_and_the_exit_code(group, code):
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a batch job's log file is
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(group=group, code=code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stdout.endswith("last words, no newline") and proc.stderr.endswith("and on stderr"), (proc.stdout, proc.stderr)
