"""Loading runs no code from the model folder: pickle weight files are never unpickled (a folder
with only them is refused; beside safetensors they are ignored) and a config asking for remote
code (auto_map) is refused, before anything is loaded."""

import os
import pickle
import shutil

import pytest

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.serve import GEMEngine
from megatron_gem.serve.cli import main as serve_main


class _Bomb:
    """Unpickling it creates the file at ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_bomb(folder, marker):
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Bomb(str(marker))}, f)


def test_pickle_only_folder_is_refused_unopened(serve_models, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(serve_models["full"], folder)
    os.remove(folder / "model.safetensors")
    marker = tmp_path / "exploded"
    _plant_bomb(folder, marker)
    with pytest.raises(ModelLoadError, match=r"no safetensors weights .*pytorch_model.bin.* pickle files, which this server never loads"):
        GEMEngine.load(str(folder))
    assert serve_main([str(folder)]) == 2 and "never loads" in capsys.readouterr().err
    # A summary-mode adapter folder whose base has only pickle weights: refused the same way.
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        GEMEngine.load(serve_models["summary"], base=str(folder))
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_opened(serve_models, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(serve_models["full"], folder)
    marker = tmp_path / "exploded"
    _plant_bomb(folder, marker)
    engine = GEMEngine.load(str(folder))
    try:
        assert engine.embed_batch([[1, 5, 6, 7]]).shape[0] == 1
    finally:
        engine.stop()
    assert not marker.exists()


def test_remote_code_is_refused(serve_models, tmp_path):
    import json

    folder = tmp_path / "remote"
    shutil.copytree(serve_models["full"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'exploded')!r}, 'w')\n")
    with pytest.raises(ModelLoadError, match="auto_map .* runs no remote code"):
        GEMEngine.load(str(folder))
    assert not (tmp_path / "exploded").exists()
