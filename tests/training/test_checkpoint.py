"""The trainer's checkpoint protocol with a stand-in engine: a save that dies half-way never
moves `latest`; resume loads what `latest` names, verified."""

import os

import pytest

from megatron_gem.common.manifest import CheckpointError
from megatron_gem.training.checkpoint import LATEST, read_latest, resolve_checkpoint
from megatron_gem.training.trainer import Engine, save_checkpoint


class FakeEngine(Engine):
    """Writes two files per checkpoint, like an engine's save; can die after the first."""

    name = "fake"

    def __init__(self, die=False):
        self.die = die
        self.loaded = None

    def save(self, save_dir, tag, state):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "model_states.pt"), "w") as f:
            f.write(repr(state))
        if self.die:
            raise KeyboardInterrupt("killed while saving")
        with open(os.path.join(save_dir, tag, "optim_states.pt"), "w") as f:
            f.write("optimizer")

    def load(self, load_dir, tag):
        self.loaded = tag
        return {"step": int(tag.replace("global_step", ""))}


def test_killed_save_leaves_latest_on_the_last_good_checkpoint(tmp_path):
    save_checkpoint(FakeEngine(), str(tmp_path), 10, {"step": 10})
    assert read_latest(str(tmp_path)) == "global_step10"
    assert sorted(os.listdir(tmp_path / "global_step10")) == ["manifest.json", "model_states.pt", "optim_states.pt", "rng_state_rank0.pt"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(die=True), str(tmp_path), 20, {"step": 20})
    assert os.path.isdir(tmp_path / "global_step20")  # the partial save exists ...
    assert read_latest(str(tmp_path)) == "global_step10"  # ... but is never the one resumed
    assert resolve_checkpoint(str(tmp_path), log=lambda *_: None) == "global_step10"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(LATEST + ".tmp")]


def test_a_write_error_removes_the_partial_save_and_names_it(tmp_path):
    class Full(FakeEngine):
        def save(self, save_dir, tag, state):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            raise OSError(28, "No space left on device", os.path.join(save_dir, tag, "optim_states.pt"))

    from megatron_gem.training.checkpoint import CheckpointWriteError

    save_checkpoint(FakeEngine(), str(tmp_path), 10, {"step": 10})
    with pytest.raises(CheckpointWriteError, match=r"global_step20 failed on rank 0: OSError: \[Errno 28\] No space left on device"):
        save_checkpoint(Full(), str(tmp_path), 20, {"step": 20})
    assert not (tmp_path / "global_step20").exists() and read_latest(str(tmp_path)) == "global_step10"


def test_a_dangling_latest_is_an_error(tmp_path):
    (tmp_path / LATEST).write_text("global_step7")
    with pytest.raises(CheckpointError, match="global_step7"):
        read_latest(str(tmp_path))
