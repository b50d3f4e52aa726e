"""GEMTrainer on 2 processes (torchrun, gloo) equals one process with the same global batch, in
both training modes, under DDP and under the Trainer's DeepSpeed ZeRO-3: the per-step losses
(their sum, NTP and InfoNCE, as logged), the trained tensors (the adapter in summary mode, every
weight in full mode) and the logit scale after every step. Under ZeRO-3 also: a run resumed
from a mid-run checkpoint ends where the uninterrupted one did, and in summary mode the
engine checkpoint carries no frozen base weight.

What it takes: the contrastive keys gathered with their gradients; the Trainer's token-count
scaling left to the NTP term; the collator drawing by global example index (rank r's example i
is example r * B + i of the global batch); the logs averaged over ranks; the logit scale a model
parameter (DeepSpeed's ZeRO optimizers refuse any other, and the Trainer zeroes only the model's
gradients: a scale kept beside the model carried each step's gradient into the next). The
worker trains with plain SGD and no clipping, so the weights compare gradients, not Adam's
normalised steps."""

import os

import pytest
import torch

from megatron_gem.testing import save_tiny_reserved_base
from tests.launch import REPO, run_python, run_torchrun

WORKER = os.path.join(REPO, "tests", "integrations", "trainer_ddp_worker.py")
ENV = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_reserved_base(tmp_path_factory.mktemp("trainer_ddp") / "base", seed=3)


MODES = ("summary", "full")


@pytest.fixture(scope="module")
def one_process(base_dir, tmp_path_factory):
    """The one-process runs (8 examples a step), both modes in one launch."""
    out = tmp_path_factory.mktemp("one_process")
    run_python([WORKER, base_dir, str(out), ",".join(MODES), "8"], env=ENV)
    return out


def _close(x, y, rel):
    return abs(x - y) <= rel * abs(x)


# ZeRO-3 in make test (the same equalities, plus a resume and the engine checkpoint); DDP, the
# same launch without sharding, in make test-long.
@pytest.mark.parametrize("engine", [pytest.param("ddp", marks=pytest.mark.long), "zero3"])
def test_gem_trainer_on_two_processes_equals_one(base_dir, one_process, tmp_path, engine):
    # Under ZeRO-3 the same launch also checkpoints at step 3 and resumes a second run from there.
    run_torchrun([WORKER, base_dir, str(tmp_path), ",".join(MODES), "4"] + (["3", "resume"] if engine == "zero3" else []), nproc=2, env=ENV)
    for mode in MODES:
        _check(one_process / mode, tmp_path / mode, mode)
        if engine == "zero3":
            _check_resumed(tmp_path / mode, mode)


def _check_resumed(two, mode):
    # The Trainer loads DeepSpeed's own checkpoint (not _load_from_checkpoint), so the collator's
    # draws must resume outside it; in summary mode the engine checkpoint holds no frozen base
    # weight and is loaded back with training.checkpoint.load_trainable_only.
    whole, resumed = torch.load(two / "result.pt"), torch.load(two / "resumed.pt")
    assert resumed["loss"] == whole["loss"]  # steps 1-3 from the checkpoint's trainer state, 4-5 its own
    assert whole["state"].keys() == resumed["state"].keys()
    assert all(torch.equal(whole["state"][k], resumed["state"][k]) for k in whole["state"]), mode
    assert torch.equal(whole["logit_scale"], resumed["logit_scale"])
    files = resumed["module_keys"]
    assert len(files) == 2  # one module-state file per ZeRO-3 rank
    for keys in files.values():
        if mode == "summary":
            assert keys and all(k.startswith(("gem_adapter.", "gem_logit_scale.")) for k in keys), keys[:5]
        else:
            assert "lm_head.weight" in keys


def _check(one, two, mode):
    a, b = torch.load(one / "result.pt"), torch.load(two / "result.pt")
    assert (a["world"], b["world"]) == (1, 2)
    for key in ("loss", "ntp", "cl"):
        assert len(a[key]) == len(b[key]) == 5
        assert [x is None for x in a[key]] == [x is None for x in b[key]]
        assert all(x is None or _close(x, y, 1e-5) for x, y in zip(a[key], b[key])), (mode, key, a[key], b[key])
    assert a["cl"][3] is not None and a["ntp"][3] is not None  # phase 2 trained both terms
    assert all(_close(x, y, 1e-5) for x, y in zip(a["scales"], b["scales"])), (mode, a["scales"], b["scales"])
    assert a["scales"][4] != a["scales"][3] != a["scales"][2]  # the scale trained in both phase-2 steps
    assert not any(a["stale_scale_grad"]) and not any(b["stale_scale_grad"])
    fresh = torch.load(one / "initial.pt")
    assert a["state"].keys() == b["state"].keys() == fresh.keys()
    moved = 0
    for k, v in a["state"].items():
        assert torch.allclose(v, b["state"][k], rtol=1e-4, atol=1e-6), (mode, k)
        moved += int(not torch.equal(v, fresh[k]))
    assert moved > len(fresh) // 2  # most tensors trained (a lora_A whose lora_B stayed 0 may not)
    rank1 = torch.load(two / "rank1.pt")
    assert all(torch.equal(rank1[k], v) for k, v in b["state"].items())  # the ranks stayed equal
    if mode == "summary":
        assert a["base_unchanged"] and b["base_unchanged"]
