"""deepspeed-to-hf: DeepSpeed's own ZeRO consolidation of a GEM DeepSpeed run gives the weights
that run exported itself."""

import json

import torch

from tests.embedder_checks import assert_embedder_ready
from tests.launch import launch, run_python


def test_zero3_checkpoint_to_hf_equals_the_runs_export(tmp_path):
    from safetensors.torch import load_file

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.testing import sample_sentences, save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(100, seed=3)))
    save = tmp_path / "run"
    args = ["--model", base, "--data", str(data), "--save", str(save), "--deepspeed", "ds_zero3.json", "--seq-length", "64",
            "--micro-batch-size", "2", "--train-iters", "2", "--gem-contrastive-from-step", "2", "--lr", "1e-3", "--save-interval", "2", "--no-progress",
            "--gem-num-special-tokens", "2", "--contrastive-query-prompt", "query: "]  # fmt: skip
    proc = launch(args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]

    out = tmp_path / "hf_from_zero"
    run_python(["tools/convert_checkpoint.py", "deepspeed-to-hf", "--input", str(save), "--model", base, "--output", str(out)])
    exported, consolidated = load_file(save / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(consolidated)
    for k in exported:
        assert torch.equal(exported[k].float(), consolidated[k]), k
    assert GEMConfig.load(out).special_token_ids == GEMConfig.load(save / "hf").special_token_ids
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(save / "hf"))
    # Both are embedder-ready (K=2: the custom sentence-transformers module), the prompt included.
    assert_embedder_ready(save / "hf", query_prompt="query: ")
    assert_embedder_ready(out, query_prompt="query: ", manifest=False)
    assert "deepspeed-to-hf" in (out / "README.md").read_text()
