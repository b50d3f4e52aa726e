"""Fixtures of the megatron-core tests (launch helpers: megatron_launch.py)."""

import pytest
from megatron_launch import run_python

@pytest.fixture(scope="session")
def gem_hf_checkpoint(tmp_path_factory):
    """A tiny untied HF Llama with the GEM token added by tools/add_gem_tokens.py."""
    from megatron_gem.testing import save_tiny_checkpoint

    base = tmp_path_factory.mktemp("mg_ckpt")
    save_tiny_checkpoint(base / "base")
    import add_gem_tokens

    assert add_gem_tokens.main(["--input", str(base / "base"), "--output", str(base / "gem")]) == 0
    return base / "gem"


@pytest.fixture(scope="session")
def converted_checkpoint(gem_hf_checkpoint, tmp_path_factory):
    """hf-to-megatron (TP=2, PP=2 target) of gem_hf_checkpoint through the command line."""
    out = tmp_path_factory.mktemp("mg_conv") / "megatron"
    run_python(["tools/convert_checkpoint.py", "hf-to-megatron", "--input", str(gem_hf_checkpoint), "--output", str(out), "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    return out
