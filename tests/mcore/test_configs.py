"""configs/megatron recipes: the documented per-GPU memory is recomputed and fits an H100-80GB;
the layouts are valid for the model and the command line parses."""

import json
import pathlib
import shlex

import pytest

from megatron_gem.mcore.llama import padded_vocab_size
from megatron_gem.mcore.memory import ModelShape, per_gpu_memory

RECIPES = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs" / "megatron").glob("*.json"))
# Published parameter counts (billions): the arithmetic starts from the right model.
KNOWN_PARAMS = {"meta-llama/Llama-3.2-1B": 1.236, "meta-llama/Llama-3.2-3B": 3.213, "meta-llama/Meta-Llama-3-8B": 8.030, "mistralai/Mistral-7B-v0.1": 7.242}
HEADROOM_GIB = 8  # CUDA context, NCCL buffers, allocator fragmentation


def test_all_models_and_cluster_sizes_present():
    names = {p.stem for p in RECIPES}
    for model in ("llama3.2-1b", "llama3.2-3b", "llama3-8b", "mistral-7b"):
        for gpus in (8, 16):
            assert f"{model}_{gpus}xh100" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_memory_and_layout(path):
    r = json.loads(path.read_text())
    m, par, b = r["model_shape"], r["parallel"], r["batch"]
    tp, pp, dp = par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"], par["data_parallel_size"]
    assert tp * pp * dp == r["gpus"]
    assert b["global_batch_size"] % (b["micro_batch_size"] * dp) == 0
    assert b["num_microbatches"] == b["global_batch_size"] // (b["micro_batch_size"] * dp)
    assert m["num_attention_heads"] % tp == 0 and m["num_key_value_heads"] % tp == 0 and m["num_layers"] % pp == 0
    assert m["padded_vocab_size"] == padded_vocab_size(m["vocab_size"] + m["gem_tokens"], tp)
    shape = ModelShape(
        m["num_layers"], m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"], m["num_key_value_heads"], m["padded_vocab_size"], m["tied"]
    )
    assert shape.total_params() / 1e9 == pytest.approx(KNOWN_PARAMS[r["hf_model"]], rel=0.01)
    mem = per_gpu_memory(
        shape,
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=b["micro_batch_size"],
        seq_length=b["seq_length"],
        num_microbatches=b["num_microbatches"],
        recompute=r["recompute_granularity"],
    )
    assert mem == r["memory_per_gpu_gib"], "documented memory arithmetic is stale"
    assert mem["total"] + HEADROOM_GIB <= r["gpu_memory_gib"]


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


def test_memory_formula_responds_to_parallelism():
    shape = ModelShape(32, 4096, 14336, 32, 8, 128512, False)
    base = per_gpu_memory(shape, tp=1, pp=1, dp=8, micro_batch_size=4, seq_length=512, num_microbatches=1, recompute=None)
    tp2 = per_gpu_memory(shape, tp=2, pp=1, dp=4, micro_batch_size=4, seq_length=512, num_microbatches=2, recompute=None)
    rec = per_gpu_memory(shape, tp=1, pp=1, dp=8, micro_batch_size=4, seq_length=512, num_microbatches=1, recompute="full")
    assert tp2["weights"] == pytest.approx(base["weights"] / 2, rel=1e-3)
    assert rec["activations"] < base["activations"] / 3
    single = per_gpu_memory(shape, tp=1, pp=1, dp=1, micro_batch_size=4, seq_length=512, num_microbatches=1, recompute=None)
    assert single["optimizer"] == pytest.approx(8 * base["optimizer"], rel=1e-3)
    assert single["total"] > 80  # 8B on one GPU does not fit: the distributed optimizer / TP are needed
