"""configs/megatron recipes: the layouts are valid for the model, the parameter count is the
published one (an independent number), the memory estimator (tools/estimate_memory.py, whose
validation against real runs is tests/training/test_memory_estimate.py) finds that each fits an
80 GB H100 with headroom, the figures written in the file are the estimator's current ones (not
stale), and the command line parses."""

import json
import pathlib
import shlex

import pytest

from megatron_gem.mcore.llama import padded_vocab_size

RECIPES = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs" / "megatron").glob("*.json"))
# Published parameter counts (billions): the arithmetic starts from the right model.
KNOWN_PARAMS = {"meta-llama/Llama-3.2-1B": 1.236, "meta-llama/Llama-3.2-3B": 3.213, "meta-llama/Meta-Llama-3-8B": 8.030, "mistralai/Mistral-7B-v0.1": 7.242}


def test_all_models_and_cluster_sizes_present():
    names = {p.stem for p in RECIPES}
    for model in ("llama3.2-1b", "llama3.2-3b", "llama3-8b", "mistral-7b"):
        for gpus in (8, 16):
            assert f"{model}_{gpus}xh100" in names


# make test estimates phase 1 of two recipes (TP/DP and PP=2, the two estimator paths); the
# other six are the same paths at other shapes (8-16 s each of fake 8B-scale measurement): make test-long.
LAYOUT_KEEP = {"llama3-8b_8xh100", "mistral-7b_16xh100"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=[] if p.stem in LAYOUT_KEEP else [pytest.mark.long]) for p in RECIPES], ids=lambda p: p.stem)
def test_recipe_layout_and_memory(path):
    from megatron_gem.training import recipes as R
    from megatron_gem.training.memory_estimate import model_counts

    r = json.loads(path.read_text())
    m, par, b = r["model_shape"], r["parallel"], r["batch"]
    tp, pp, dp = par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"], par["data_parallel_size"]
    assert tp * pp * dp == r["gpus"]
    assert b["global_batch_size"] % (b["micro_batch_size"] * dp) == 0
    assert b["num_microbatches"] == b["global_batch_size"] // (b["micro_batch_size"] * dp)
    assert m["num_attention_heads"] % tp == 0 and m["num_key_value_heads"] % tp == 0 and m["num_layers"] % pp == 0
    assert m["padded_vocab_size"] == padded_vocab_size(m["vocab_size"] + m["gem_tokens"], tp)
    recipe = R.from_megatron_json(path)
    counts = model_counts(R.hf_config(recipe.model), vocab_size=m["padded_vocab_size"])
    assert counts.total / 1e9 == pytest.approx(KNOWN_PARAMS[r["hf_model"]], rel=0.01)
    est = R.estimate(recipe)
    assert R.fits(est), est.gb()
    assert r["memory_per_gpu_gb"] == pytest.approx(est.gb(), rel=0.01), f"{path.name}: rerun {r['memory_command']} and write its figures"


# Phase 2 of one recipe in make test (the 8B flagship: TP=2, SP, GradCache); the others in
# make test-long (the same estimator, other shapes; each an 8B-scale fake measurement).
PHASE2_KEEP = {"llama3-8b_8xh100"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=[] if p.stem in PHASE2_KEEP else [pytest.mark.long]) for p in RECIPES], ids=lambda p: p.stem)
def test_recipe_phase2_memory(path):
    """Phase 2 (the command's contrastive batch, train.py's default 8 x micro-batch pairs unless
    it sets --contrastive-batch-size, in its GradCache chunks) fits with the same headroom, and
    the written figures are the estimator's current ones."""
    from megatron_gem.training import recipes as R

    r = json.loads(path.read_text())
    est = R.estimate_phase2(R.from_megatron_json(path))
    assert R.fits(est), est.gb()
    assert r["phase2_memory_per_gpu_gb"] == pytest.approx(est.gb(), rel=0.01), f"{path.name}: rerun {r['memory_command']} and write its figures"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_command_parses(path):
    from megatron_gem.training.args import build_megatron_parser, wants_megatron

    r = json.loads(path.read_text())
    argv = shlex.split(r["command"].replace("$MODEL_DIR", "m").replace("$DATA", "d").replace("$SAVE", "s"))
    argv = argv[argv.index("train.py") + 1 :]
    assert wants_megatron(argv)
    args = build_megatron_parser().parse_args(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (
        r["parallel"]["tensor_model_parallel_size"],
        r["parallel"]["pipeline_model_parallel_size"],
    )
    assert (args.micro_batch_size, args.global_batch_size, args.seq_length) == (
        r["batch"]["micro_batch_size"],
        r["batch"]["global_batch_size"],
        r["batch"]["seq_length"],
    )
    assert args.sequence_parallel == r["parallel"]["sequence_parallel"] and args.recompute_granularity == r["recompute_granularity"]
