"""The one rule for collectives (megatron_gem/common/distributed.py): the device is decided by
the process group's backend, and no other module calls torch.distributed's collectives.

The rule running through train.py, both engines, is tests/training/test_collective_device.py;
here the decision itself (NCCL's backend cannot be created on this machine: its answers are
faked) and the static check that every collective of the project goes through the rule."""

import ast
import os

import pytest
import torch

from megatron_gem.common import distributed as D

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULE = os.path.join("megatron_gem", "common", "distributed.py")
# torch.distributed's collectives, tensor and object ones, and point-to-point.
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}


def _python_files():
    for top in ("megatron_gem", "tools"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            yield from (os.path.join(root, f) for f in files if f.endswith(".py"))
    yield os.path.join(REPO, "train.py")


def _collective_calls(path: str) -> list[str]:
    """``name:line`` of every use of a torch.distributed collective in ``path``."""
    tree = ast.parse(open(path).read(), filename=path)
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases |= {a.asname or "distributed" for a in node.names if a.name == "distributed"}
            if node.module in ("torch.distributed", "torch.distributed.distributed_c10d"):
                found += [f"{a.name}:{node.lineno}" for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"{node.attr}:{node.lineno}")
    return found


def test_only_the_rule_calls_collectives():
    """Every collective of the package, the kernels, the tools and train.py is a function of
    common/distributed.py, so each one takes its device from comm_device."""
    offenders = {}
    for path in _python_files():
        rel = os.path.relpath(path, REPO)
        if os.path.realpath(path) != os.path.realpath(os.path.join(REPO, RULE)) and (calls := _collective_calls(path)):
            offenders[rel] = calls
    assert offenders == {}, f"call these through megatron_gem.common.distributed: {offenders}"
    assert _collective_calls(os.path.join(REPO, RULE))  # the check does see a collective


@pytest.fixture
def fake_group(monkeypatch):
    """A process group whose backend (and CUDA devices) the test sets: ``set(backend, cuda=...)``."""

    def set_(backend: str, *, cuda: bool = True, current: int = 1, count: int = 2, local_rank: str | None = "1"):
        monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(D.dist, "get_backend", lambda group=None: backend)
        monkeypatch.setattr(D.dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(D, "rank", lambda: 3)
        if local_rank is None:
            monkeypatch.delenv("LOCAL_RANK", raising=False)
        else:
            monkeypatch.setenv("LOCAL_RANK", local_rank)

    return set_


def test_no_process_group_communicates_on_the_cpu():
    assert D.comm_device() == torch.device("cpu")


def test_nccl_communicates_on_the_ranks_gpu_and_gloo_on_the_cpu(fake_group):
    fake_group("nccl")
    assert D.comm_device() == torch.device("cuda", 1)
    fake_group("gloo")
    assert D.comm_device() == torch.device("cpu")
    fake_group("cpu:gloo,cuda:nccl")  # a group of both: the GPU when there is one
    assert D.comm_device() == torch.device("cuda", 1)
    fake_group("cpu:gloo,cuda:nccl", cuda=False)
    assert D.comm_device() == torch.device("cpu")
    fake_group("nccl", current=0, count=1, local_rank="3")  # the launcher shows this rank one GPU
    assert D.comm_device() == torch.device("cuda", 0)
    fake_group("nccl", current=0, local_rank=None)  # no launcher: trust the current device
    assert D.comm_device() == torch.device("cuda", 0)


def test_a_rank_that_did_not_bind_its_gpu_is_refused(fake_group):
    fake_group("nccl", current=0, local_rank="1")  # rank on LOCAL_RANK 1 left on cuda:0
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1\) would communicate on cuda:0, not on its own GPU cuda:1: call .*bind_local_device"):
        D.comm_device()
    with pytest.raises(RuntimeError, match="bind_local_device"):  # object collectives check it too
        D.all_gather_object("x")


def test_an_unknown_backend_is_named(fake_group):
    fake_group("mpi")
    with pytest.raises(ValueError, match=r"backend 'mpi': the communication device is known for \['gloo', 'nccl'\] only"):
        D.comm_device()


def test_results_come_back_on_the_callers_device_unchanged():
    """Without a process group the helpers are the identity (one process: nothing to move)."""
    v = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(v) is v and D.all_gather_tensors(v) == [v] and D.all_gather_object(5) == [5] and D.gather_object(5) == [5]
