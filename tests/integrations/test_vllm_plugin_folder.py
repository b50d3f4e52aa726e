"""The vLLM plugin's view of a GEM folder, without vLLM (megatron_gem/integrations/vllm_plugin/
folder.py, cli.py): what it serves, with which ``vllm serve`` arguments, and what it refuses in
one line before vLLM starts. The serving itself: test_vllm_plugin.py (make test-vllm)."""

import json
import os
import shutil

import pytest

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.hf.export import export_summary_adapter
from megatron_gem.integrations.vllm_plugin.cli import main, vllm_serve_args
from megatron_gem.integrations.vllm_plugin.folder import open_gem_folder
from megatron_gem.testing import save_tiny_gem_export, save_tiny_reserved_base, tiny_summary_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_folders")
    base = save_tiny_reserved_base(root / "base", seed=1)
    out = {"base": base, "full1": save_tiny_gem_export(root / "full1", 1), "full2": save_tiny_gem_export(root / "full2", 2)}
    for k in (1, 2):
        lm, tok, cfg, adapter = tiny_summary_model(base, k, seed=k)
        out[f"summary{k}"] = export_summary_adapter(lm, adapter, tok, cfg, str(root / f"summary{k}"), {}, base_path=base)
    lm, tok, cfg, adapter = tiny_summary_model(base, 1, seed=3)
    out["contained"] = export_summary_adapter(lm, adapter, tok, cfg, str(root / "contained"), {}, base_path=base, self_contained=True)
    return out


def test_full_export_is_served_as_the_model(folders):
    path = folders["full1"]
    folder = open_gem_folder(path)
    assert folder.model_dir == path and folder.adapter_dir is None and folder.summary_id == folder.config.special_token_ids[0]
    args = vllm_serve_args(path, extra=["--port", "9"])
    assert args[:3] == [path, "--runner", "pooling"] and "--tokenizer" not in args
    assert json.loads(args[args.index("--hf-overrides") + 1]) == {"architectures": ["GEMForEmbedding"]}
    assert args[-4:] == ["--served-model-name", path, "--port", "9"]


def test_adapter_folder_is_served_on_its_base(folders):
    path, base = folders["summary1"], os.path.abspath(folders["base"])
    args = vllm_serve_args(path, extra=["--served-model-name", "gem"])
    assert args[0] == base and args[args.index("--tokenizer") + 1] == path
    assert json.loads(args[args.index("--hf-overrides") + 1]) == {"architectures": ["GEMForEmbedding"], "gem_dir": path}
    assert args.count("--served-model-name") == 1 and args[-2:] == ["--served-model-name", "gem"]
    # A self-contained folder brings its base; --base names another copy (its digest checked).
    assert open_gem_folder(folders["contained"]).model_dir == os.path.join(folders["contained"], "base")
    assert open_gem_folder(folders["contained"], base=base).model_dir == base


@pytest.mark.parametrize("name", ["full2", "summary2"])
def test_two_summary_tokens_are_refused(folders, name):
    with pytest.raises(ModelLoadError, match="num_special_tokens=2.*causal attention only"):
        open_gem_folder(folders[name])


def test_what_the_plugin_cannot_serve_is_refused(folders, tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="no gem_config.json"):
        open_gem_folder(folders["base"])
    other = str(tmp_path / "mistral")
    shutil.copytree(folders["full1"], other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    json.dump({**cfg, "model_type": "mistral"}, open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ModelLoadError, match="model_type 'mistral'"):
        open_gem_folder(other)
    with pytest.raises(ModelLoadError, match="--base .* full-mode export"):
        open_gem_folder(folders["full1"], base=folders["base"])
    # The summary-adapter guard and the base digest (hf/summary_files.py) run before vLLM starts.
    assert main(["serve", folders["summary1"], "--base", folders["full1"], "--print"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "wrong base checkpoint" in err


def test_print_writes_the_vllm_serve_command(folders, capsys):
    assert main(["serve", folders["full1"], "--print", "--port", "8001"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"vllm serve {folders['full1']} --runner pooling --hf-overrides ") and out.endswith("--port 8001")
