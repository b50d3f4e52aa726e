"""Bad arguments fail at start with one clear message; DeepSpeed configs get their "auto" filled."""

import json
import os

import pytest

from megatron_gem.training.args import ArgumentError, job_config, parse_args
from megatron_gem.training.ds_config import load_ds_config
from megatron_gem.training.main import main
from tests.launch import REPO


def args_for(tiny_inputs, tmp_path, *extra):
    return [
        "--model",
        tiny_inputs["model"],
        "--data",
        tiny_inputs["data"],
        "--save",
        str(tmp_path / "out"),
        "--train-iters",
        "4",
        "--gem-contrastive-from-step",
        "2",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--micro-batch-size", "3", "--global-batch-size", "4"], "--global-batch-size 4 is not divisible by --micro-batch-size 3"),
        (["--gem-contrastive-from-step", "9"], "--gem-contrastive-from-step 9 is after --train-iters 4"),
        (["--gem-p-raw", "1.5"], "p_raw"),
        (["--seq-length", "3"], "--seq-length 3"),
        (["--load", "README.md"], "--load README.md: is a file"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--model", "README.md"], "--model README.md: is a file"),
        (["--tokenizer", "./no/tokenizer"], "--tokenizer ./no/tokenizer: no such directory"),
        (["--data", "tests"], "--data tests: is a directory"),
        (["--deepspeed", "pyproject.toml"], "--deepspeed pyproject.toml:1: not valid JSON"),
        (["--save", "README.md"], "--save README.md: is a file"),
        (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed /nonexistent/ds.json"),
        (["--contrastive-data", "/nonexistent/pairs.jsonl"], "--contrastive-data /nonexistent/pairs.jsonl: no such file"),
        (["--contrastive-data", "hf:x", "--gem-contrastive-from-step", "4"], "--contrastive-data is given but phase 2 never runs"),
        (["--contrastive-query-field", "text", "--contrastive-positive-field", "text"], "are both 'text'"),
        (["--contrastive-micro-batch-size", "9"], "--contrastive-micro-batch-size 9 must lie in [1, --contrastive-batch-size 8]"),
        (["--contrastive-negative-field", "neg"], "need --contrastive-data"),
        (["--hf-export-self-contained"], "--hf-export-self-contained needs --gem-train summary"),
        (["--save-total-limit", "0"], "--save-total-limit must be >= 1"),
        (["--data-cache-path", "README.md"], "--data-cache-path README.md: is a file"),
        (["--contrastive-data", "hf:x", "--contrastive-negatives-required"], "--contrastive-negatives-required needs --contrastive-negative-field"),
        (
            ["--contrastive-micro-batch-size", "2", "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"],
            "--contrastive-micro-batch-size (GradCache) is not supported with --pipeline-model-parallel-size > 1",
        ),
    ],
)
def test_bad_arguments_fail_at_start(tiny_inputs, tmp_path, capsys, extra, message):
    assert main(args_for(tiny_inputs, tmp_path, *extra)) == 2
    out = capsys.readouterr().out
    assert out.startswith("train.py: error:") and message in out


def test_missing_data_and_model(tiny_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = args_for(tiny_inputs, tmp_path)
    args[args.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert main(args) == 2 and "missing.jsonl: no such file" in capsys.readouterr().out
    args = args_for(tiny_inputs, tmp_path)
    args[args.index("--model") + 1] = str(tmp_path / "no_model")
    assert main(args) == 2 and "no_model: no such directory" in capsys.readouterr().out


def test_repo_id_offline_and_not_cached_is_refused(tiny_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    args = args_for(tiny_inputs, tmp_path)
    args[args.index("--model") + 1] = "meta-llama/Llama-3.2-1B"
    assert main(args) == 2
    out = capsys.readouterr().out
    assert out.startswith("train.py: error: --model meta-llama/Llama-3.2-1B: no such directory") and "HF_HUB_OFFLINE" in out


def test_unreadable_data_file_is_named(tiny_inputs, tmp_path, capsys, monkeypatch):
    # As root every file is readable; what the check relies on is os.access, so ask it.

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == tiny_inputs["data"] else real(p, mode))
    assert main(args_for(tiny_inputs, tmp_path)) == 2
    assert f"--data {tiny_inputs['data']}: file is not readable" in capsys.readouterr().out


def test_model_without_causal_lm_head_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from megatron_gem.common.errors import ModelLoadError
    from megatron_gem.hf.model import load_causal_lm

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no causal LM head"):
        load_causal_lm(str(tmp_path), dtype=None)


def test_global_batch_defaults_to_micro_times_dp(tiny_inputs, tmp_path):
    job = job_config(parse_args(args_for(tiny_inputs, tmp_path, "--micro-batch-size", "2")), world_size=4)
    assert job.batch.global_batch_size == 8 and job.batch.data_parallel_size == 4 and job.batch.accumulation_steps == 1
    args = parse_args(args_for(tiny_inputs, tmp_path, "--micro-batch-size", "2", "--global-batch-size", "12"))
    with pytest.raises(ArgumentError, match="data-parallel size 4"):
        job_config(args, world_size=4)


def test_the_namespace_becomes_a_typed_job_config(tiny_inputs, tmp_path):
    job = job_config(
        parse_args(
            args_for(
                tiny_inputs,
                tmp_path,
                "--gem-alpha",
                "0.5",
                "--tensor-model-parallel-size",
                "2",
                "--no-check-for-nan-in-loss-and-grad",
                "--no-gem-summary-fast-path",
            )
        ),
        world_size=4,
    )
    assert job.model.summary_fast_path is False
    assert job.parallel.engine == "megatron" and job.parallel.tensor_model_parallel_size == 2 and job.batch.data_parallel_size == 2
    assert job.gem.alpha == 0.5 and job.gem.contrastive_from_step == 2 and job.optimizer.train_iters == 4
    assert job.model.path == tiny_inputs["model"] and job.data.paths == [tiny_inputs["data"]] and job.run.check_for_nan_in_loss_and_grad is False
    default = job_config(parse_args(args_for(tiny_inputs, tmp_path)), world_size=1)
    assert default.parallel.engine == "deepspeed" and default.model.summary_fast_path is True
    json.dumps(job.to_dict())  # what training_info.json records


class _Cfg:
    hidden_size = 4096


def _job(tiny_inputs, tmp_path, *extra):
    return job_config(parse_args(args_for(tiny_inputs, tmp_path, "--micro-batch-size", "2", "--global-batch-size", "32", "--bf16", *extra)), world_size=8)


@pytest.mark.parametrize("name", ["ds_zero3.json", "configs/deepspeed/ds_zero2.json", "configs/deepspeed/ds_zero3_offload.json"])
def test_shipped_configs_fill_every_auto(tiny_inputs, tmp_path, name):
    cfg = load_ds_config(os.path.join(REPO, name), _job(tiny_inputs, tmp_path), _Cfg())
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 2 and cfg["train_batch_size"] == 32
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(cfg)
    if cfg["zero_optimization"]["stage"] == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert cfg["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 4096


def test_config_conflicts_are_named(tiny_inputs, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 conflicts with --micro-batch-size"):
        load_ds_config(str(path), _job(tiny_inputs, tmp_path), _Cfg())
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="scheduler"):
        load_ds_config(str(path), _job(tiny_inputs, tmp_path), _Cfg())
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.sub_group_size"):
        load_ds_config(str(path), _job(tiny_inputs, tmp_path), _Cfg())
    path.write_text('{"bf16": {\n "enabled": true,,}}')
    with pytest.raises(ValueError, match="line 2"):
        load_ds_config(str(path), _job(tiny_inputs, tmp_path), _Cfg())


def blend_args(tiny_inputs, tmp_path, *data_path):
    args = args_for(tiny_inputs, tmp_path)
    i = args.index("--data")
    return args[:i] + ["--data-path", *data_path] + args[i + 2 :]


def test_data_path_reads_megatron_blends(tiny_inputs, tmp_path):
    data = tiny_inputs["data"]
    job = job_config(parse_args(blend_args(tiny_inputs, tmp_path, "0.7", data, "3e-1", data)), world_size=1)
    assert job.data.blend_paths == [data, data] and job.data.blend_weights == [0.7, 0.3] and job.data.paths == []
    job = job_config(parse_args(blend_args(tiny_inputs, tmp_path, data, data)), world_size=1)  # unweighted: in proportion to size
    assert job.data.blend_paths == [data, data] and job.data.blend_weights is None
    json.dumps(job.to_dict())


@pytest.mark.parametrize(
    "entries, message",
    [
        (["0.5", "{data}", "-1", "{data}"], "--data-path -1 {data}: the weight must be a positive number"),
        (["0.5", "{data}", "nan", "{data}"], "--data-path nan {data}: the weight must be a positive number"),
        (["0.5", "{data}", "0.5", "/nonexistent/part"], "--data-path /nonexistent/part: no such file (nor /nonexistent/part.bin/.idx"),
        (["{data}", "/nonexistent/part"], "--data-path /nonexistent/part: no such file"),
        (["0.5", "{data}", "{data}"], "'0.5' looks like a weight, but weights and paths do not alternate"),
        (["tests"], "--data-path tests: is a directory"),
    ],
)
def test_bad_blends_are_named(tiny_inputs, tmp_path, capsys, entries, message):
    data = tiny_inputs["data"]
    assert main(blend_args(tiny_inputs, tmp_path, *(e.format(data=data) for e in entries))) == 2
    out = capsys.readouterr().out
    assert out.startswith("train.py: error:") and message.format(data=data) in out, out


def test_data_and_data_path_exclude_each_other(tiny_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(args_for(tiny_inputs, tmp_path, "--data-path", tiny_inputs["data"]))
    assert "argument --data-path: not allowed with argument --data" in capsys.readouterr().err
    args = args_for(tiny_inputs, tmp_path)
    i = args.index("--data")
    with pytest.raises(SystemExit):
        parse_args(args[:i] + args[i + 2 :])
    assert "one of the arguments --data --data-path is required" in capsys.readouterr().err


@pytest.mark.parametrize("entries", [["30", "a", "70", "b"], ["a", "b"], ["a"], ["a", "b", "c"], ["0.5", "a"]])
def test_data_path_reads_as_megatron_core_reads_it(entries):
    import warnings

    from megatron_gem.training.args import parse_data_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.utils import get_blend_from_list
    assert parse_data_path(entries) == get_blend_from_list(entries)


def test_an_error_after_start_up_tears_the_process_group_down(tiny_inputs, tmp_path, capsys):
    # A broken line is found only when the corpus is read, after the process group exists. The
    # group must go down before the process exits (a live gloo group can abort the interpreter
    # at finalisation), on this path as on the successful one.
    import torch.distributed as dist

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    args = args_for(tiny_inputs, tmp_path)
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    out = capsys.readouterr().out
    assert out.startswith("train.py: error:") and "bad.jsonl:2" in out
    assert not dist.is_initialized()
