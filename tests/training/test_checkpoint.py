"""The trainer's checkpoint protocol with a stand-in engine: a save that dies half-way never
moves `latest`; resume loads what `latest` names, verified."""

import os

import pytest

from megatron_gem.common.manifest import CheckpointError
from megatron_gem.training.checkpoint import LATEST, read_latest, resolve_checkpoint
from megatron_gem.training.run import Engine, save_checkpoint


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


def _tags(path):
    return sorted((p.name for p in path.iterdir() if p.name.startswith("global_step")), key=lambda n: (len(n), n))


def test_rotation_keeps_the_newest_and_never_touches_what_it_did_not_write(tmp_path):
    # What the run did not write, or not completely: a foreign directory and file, a directory
    # whose name only looks like a tag, a half-written save (no manifest: being written, or
    # killed), a complete checkpoint of another engine, and a save newer than the resumed one.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "global_step1_backup").mkdir()
    (tmp_path / "global_step3").mkdir()
    (tmp_path / "global_step3" / "model_states.pt").write_text("half")
    from megatron_gem.common.manifest import write_manifest

    (tmp_path / "global_step5").mkdir()
    (tmp_path / "global_step5" / "weights").write_text("another engine's")
    write_manifest(str(tmp_path / "global_step5"), extra={"step": 5, "engine": "other"})
    logs = []
    for step in (2, 4, 6):
        save_checkpoint(FakeEngine(), str(tmp_path), step, {"step": step}, keep=2)
    assert _tags(tmp_path) == ["global_step3", "global_step4", "global_step5", "global_step6", "global_step1_backup"]
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and read_latest(str(tmp_path)) == "global_step6"
    # A resume from step 4 (say --load-fallback past a damaged step 6) saving step 5 again:
    # the newer step 6 is not older than the save, so it stays; step 4 is the one kept beside it.
    (tmp_path / LATEST).write_text("global_step4")
    import shutil

    shutil.rmtree(tmp_path / "global_step5")
    save_checkpoint(FakeEngine(), str(tmp_path), 5, {"step": 5}, keep=1)
    assert _tags(tmp_path) == ["global_step3", "global_step5", "global_step6", "global_step1_backup"]
    # A killed rotation's leftover (renamed aside, half removed) goes with the next rotation.
    (tmp_path / "global_step4.rotating").mkdir()
    from megatron_gem.training.checkpoint import rotate_checkpoints

    rotate_checkpoints(str(tmp_path), 1, newest="global_step5", engine="fake", log=logs.append)
    assert not (tmp_path / "global_step4.rotating").exists() and read_latest(str(tmp_path)) == "global_step5"


def test_rotation_deletes_nothing_when_latest_is_not_the_new_save(tmp_path):
    from megatron_gem.training.checkpoint import rotate_checkpoints

    for step in (1, 2, 3):
        save_checkpoint(FakeEngine(), str(tmp_path), step, {"step": step})
    (tmp_path / LATEST).write_text("global_step2")
    logs = []
    assert rotate_checkpoints(str(tmp_path), 1, newest="global_step3", engine="fake", log=logs.append) == []
    assert _tags(tmp_path) == ["global_step1", "global_step2", "global_step3"] and "nothing deleted" in logs[0]
    (tmp_path / LATEST).write_text("global_step3")
    (tmp_path / "global_step3" / "optim_states.pt").write_text("cut")  # not the size its manifest says
    assert rotate_checkpoints(str(tmp_path), 1, newest="global_step3", engine="fake", log=logs.append) == []
    assert "optim_states.pt" in logs[1]
