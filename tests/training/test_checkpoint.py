"""Checkpoint atomicity: a save that dies half-way never moves `latest`."""

import os

import pytest

from megatron_gem.training.checkpoint import LATEST, load_engine_checkpoint, read_latest, save_engine_checkpoint


class FakeEngine:
    """Writes files like DeepSpeed's save_checkpoint; can die after the first file."""

    def __init__(self, die=False):
        self.die = die
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False, "train.py writes `latest` itself, atomically"
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "model_states.pt"), "w") as f:
            f.write(repr(client_state))
        if self.die:
            raise KeyboardInterrupt("killed while saving")
        with open(os.path.join(save_dir, tag, "optim_states.pt"), "w") as f:
            f.write("optimizer")

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        self.loaded = tag
        return os.path.join(load_dir, tag), {"step": int(tag.replace("global_step", ""))}


def test_killed_save_leaves_latest_on_the_last_good_checkpoint(tmp_path):
    save_engine_checkpoint(FakeEngine(), str(tmp_path), 10, {"step": 10})
    assert read_latest(str(tmp_path)) == "global_step10"
    with pytest.raises(KeyboardInterrupt):
        save_engine_checkpoint(FakeEngine(die=True), str(tmp_path), 20, {"step": 20})
    assert os.path.isdir(tmp_path / "global_step20")  # the partial save exists ...
    assert read_latest(str(tmp_path)) == "global_step10"  # ... but is never the one resumed
    engine = FakeEngine()
    assert load_engine_checkpoint(engine, str(tmp_path))["step"] == 10 and engine.loaded == "global_step10"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(LATEST + ".tmp")]


def test_no_checkpoint_means_a_fresh_start_and_a_dangling_latest_is_an_error(tmp_path):
    assert load_engine_checkpoint(FakeEngine(), str(tmp_path)) is None
    (tmp_path / LATEST).write_text("global_step7")
    with pytest.raises(ValueError, match="global_step7"):
        read_latest(str(tmp_path))
