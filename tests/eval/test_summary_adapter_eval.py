"""Summary-mode adapter folders in the evaluation entry points: the mteb wrapper embeds with the
adapter (the baselines and lm-eval run on the base model, which IS the generation model), and a
wrong base is refused with one clear line by the tools."""

import json
import os
import re
import shutil

import pytest
import torch

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.embedder import GEMEmbedder
from megatron_gem.eval.lm import run_lm_eval
from megatron_gem.eval.mteb_model import load_mteb_model
from megatron_gem.hf.export import export_summary_adapter
from megatron_gem.hf.summary_files import load_generation_model
from megatron_gem.testing import sample_sentences, save_tiny_reserved_base, tiny_summary_model
from tests.launch import load_tool

TEXTS = sample_sentences(4, seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary_eval")
    base = save_tiny_reserved_base(root / "base", seed=6)
    other = save_tiny_reserved_base(root / "other", seed=7)
    lm, tok, cfg, adapter = tiny_summary_model(base, 2, seed=1)
    return export_summary_adapter(lm, adapter, tok, cfg, str(root / "adapter"), base_path=base), base, other


def test_mteb_wrapper_embeds_with_the_adapter_and_baselines_use_the_base(folders):
    adapter, base, _ = folders
    gem = load_mteb_model(adapter, "gem", max_length=64, show_progress_bar=False)
    ref = GEMEmbedder.from_pretrained(adapter, max_length=64).encode(TEXTS)
    assert torch.allclose(torch.as_tensor(gem.encode_fn(TEXTS)), ref, atol=1e-6)
    mean_adapter = load_mteb_model(adapter, "mean", max_length=64, show_progress_bar=False).encode_fn(TEXTS)
    mean_base = load_mteb_model(base, "mean", max_length=64, show_progress_bar=False).encode_fn(TEXTS)
    assert torch.equal(torch.as_tensor(mean_adapter), torch.as_tensor(mean_base))


def test_lm_eval_of_an_adapter_folder_is_the_base_model(folders, tmp_path):
    adapter, base, other = folders
    kw = dict(tasks=["perplexity"], perplexity_texts=4, batch_size=2, show_progress_bar=False)
    a = run_lm_eval(adapter, work_dir=str(tmp_path / "a"), **kw)
    b = run_lm_eval(base, work_dir=str(tmp_path / "b"), **kw)
    assert a == b
    with pytest.raises(ModelLoadError, match="wrong base checkpoint"):
        run_lm_eval(adapter, work_dir=str(tmp_path / "c"), base=other, **kw)
    stripped = str(tmp_path / "stripped")  # a GEM folder whose config lost its invocation tokens
    shutil.copytree(adapter, stripped)
    peft_config = json.load(open(os.path.join(stripped, "adapter_config.json")))
    del peft_config["alora_invocation_tokens"]
    json.dump(peft_config, open(os.path.join(stripped, "adapter_config.json"), "w"))
    with pytest.raises(ModelLoadError, match="no alora_invocation_tokens"):
        run_lm_eval(stripped, work_dir=str(tmp_path / "d"), **kw)
    os.remove(os.path.join(stripped, "gem_config.json"))  # now someone's plain LoRA folder: theirs, loaded as transformers loads it
    lm, _ = load_generation_model(stripped)
    assert any(hasattr(m, "lora_A") for m in lm.modules())


def test_tools_refuse_a_wrong_base_in_one_line(folders, tmp_path, capsys):
    adapter, _, other = folders
    lm_tool = load_tool("eval_lm")
    assert lm_tool.main(["--model", adapter, "--base", other, "--tasks", "perplexity", "--output", str(tmp_path / "lm")]) == 2
    assert "eval_lm: " in capsys.readouterr().err
    mteb_tool = load_tool("eval_mteb")
    assert mteb_tool.main(["--model", adapter, "--base", other, "--tasks", "SimLex999", "--scale", "0.03", "--output", str(tmp_path / "mteb")]) == 2
    assert re.search("^eval_mteb: .*wrong base checkpoint", capsys.readouterr().err, re.M)
