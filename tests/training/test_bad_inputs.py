"""train.py under bad input: one line on stderr naming the flag or file, exit 2, before any
model loads (the engine is replaced by one that fails the test if it is ever built), nothing
touched on disk; a --save holding another run is resumed only with --load, replaced only with
--overwrite-output-dir (and then only what the manifests list); every flag has help text."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_gem.training.main import main
from tests.bad_input import forbid, tree
from tests.launch import REPO, launch, read_metrics, subprocess_env


def args_for(tiny_inputs, save, *extra):
    return ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(save), "--train-iters", "4", "--gem-contrastive-from-step", "2",
            "--seq-length", "64", "--no-progress", *extra]  # fmt: skip


@pytest.fixture
def no_model_load(monkeypatch):
    """The time to fail is bounded by construction: building an engine (or loading a model)
    fails the test, so a refusal must come before."""
    import megatron_gem.training.main as m
    from megatron_gem.hf import model

    forbid(monkeypatch, "an engine (a model load)", (m, "make_engine"), (model, "load_causal_lm"))


def _another_run(save):
    """A --save directory as an earlier train.py run leaves it (a checkpoint with its manifest)."""
    from megatron_gem.common.manifest import write_manifest

    (save / "global_step2").mkdir(parents=True)
    (save / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    write_manifest(str(save / "global_step2"))
    (save / "latest").write_text("global_step2")
    (save / "metrics.jsonl").write_text('{"step": 1}\n')


def _cases(root, tiny_inputs):
    def ds(name, content):
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return str(path)

    empty = root / "empty"
    empty.mkdir()
    config_only = root / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_inputs["model"], "config.json"), config_only)
    loop = root / "loop"
    os.symlink(loop, loop)
    other_run = root / "other_run"
    _another_run(other_run)
    user_dir = root / "user_dir"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    unlisted = root / "unlisted_run"
    _another_run(unlisted)
    (unlisted / "global_step2" / "notes.txt").write_text("precious")
    foreign_hf = root / "foreign_hf_run"
    _another_run(foreign_hf)
    (foreign_hf / "hf").mkdir()
    (foreign_hf / "hf" / "config.json").write_text("{}")
    (root / "file.txt").write_text("x")
    stage7 = ds("stage7.json", b'{\n  "train_batch_size": "auto",\n  "zero_optimization": {\n    "stage": 7\n  }\n}\n')
    save = root / "out"
    return {
        "ds config a JSON list": (["--deepspeed", ds("list.json", [1, 2])], "list.json:1: a DeepSpeed config is a JSON object, this file holds a JSON list"),
        "ds ZeRO stage 7": (["--deepspeed", stage7], f"--deepspeed {stage7}:4: zero_optimization.stage is 7; DeepSpeed's ZeRO stages are 0, 1, 2 and 3"),
        "ds batch arithmetic": (
            ["--deepspeed", ds("batch.json", {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8})],
            "train_batch_size 10 is not train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 8 x data-parallel size 1 = 16",
        ),
        "ds batch against the flags": (
            ["--deepspeed", ds("flags.json", {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8})],
            "train_micro_batch_size_per_gpu=2 conflicts with --micro-batch-size (which gives 1)",
        ),
        "ds batch a string": (
            ["--deepspeed", ds("str.json", {"train_micro_batch_size_per_gpu": "two"})],
            "train_micro_batch_size_per_gpu is 'two'; a positive integer",
        ),
        "ds bf16 not a bool": (["--deepspeed", ds("bf16.json", {"bf16": {"enabled": "yes"}})], "bf16.enabled is 'yes'; true, false or \"auto\""),
        "ds config 0 bytes": (["--deepspeed", ds("zero.json", b"")], "zero.json:1: not valid JSON"),
        "ds config not UTF-8": (["--deepspeed", ds("latin.json", b'{"x": "\xe9"}')], "latin.json:1: not UTF-8 text"),
        "seq-length above positions": (["--seq-length", "4096"], "--seq-length 4096 is above --model"),
        "save holds another run": (
            ["--save", str(other_run)],
            f"--save {other_run}: holds the checkpoints of another run (global_step2; latest: global_step2); resume it with --load {other_run}",
        ),
        "save holds the user's files": (["--save", str(user_dir)], f"--save {user_dir}: is not empty (it holds notes.txt)"),
        "save a link loop": (["--save", str(loop)], "link loop"),
        "overwrite, unlisted file": (
            ["--save", str(unlisted), "--overwrite-output-dir"],
            f"{unlisted / 'global_step2' / 'notes.txt'}: not listed in its checkpoint's manifest.json",
        ),
        "overwrite, foreign hf/": (["--save", str(foreign_hf), "--overwrite-output-dir"], f"{foreign_hf / 'hf'}: not an export of megatron-gem"),
        "K = 0": (["--gem-num-special-tokens", "0"], "--gem-num-special-tokens 0: must be an integer >= 1"),
        "logit scale above its max": (["--gem-logit-scale-init", "200"], "--gem-logit-scale-init 200.0: must lie in [1, --gem-logit-scale-max 100.0]"),
        "model an empty directory": (["--model", str(empty)], f"--model {empty}: is empty: no config.json, no tokenizer files"),
        "model without tokenizer": (["--model", str(config_only)], f"--model {config_only}: is not a model directory: no tokenizer files"),
        "model a typo path": (["--model", "./no/such/model"], "--model ./no/such/model: no such directory"),
        "model a data file name": (["--model", "corpus.jsonl"], "--model corpus.jsonl: no such directory"),
        "model a link loop": (["--model", str(loop)], "link loop"),
        "tokenizer a file": (["--tokenizer", str(root / "file.txt")], "file.txt: is a file"),
    }, save


CASES = ["ds config a JSON list", "ds ZeRO stage 7", "ds batch arithmetic", "ds batch against the flags", "ds batch a string", "ds bf16 not a bool", "ds config 0 bytes",
         "ds config not UTF-8", "seq-length above positions", "save holds another run", "save holds the user's files", "save a link loop",
         "overwrite, unlisted file", "overwrite, foreign hf/", "K = 0", "logit scale above its max", "model an empty directory",
         "model without tokenizer", "model a typo path", "model a data file name", "model a link loop", "tokenizer a file"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_table(tiny_inputs, tmp_path, capsys, monkeypatch, no_model_load, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "work"
    root.mkdir()
    cases, save = _cases(root, tiny_inputs)
    extra, message = cases[case]
    before = tree(root)
    assert main(args_for(tiny_inputs, save, *extra)) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], err
    assert "GEMConfig." not in lines[0] and "error" not in out  # flag names, on stderr only
    assert tree(root) == before  # nothing written, --save not even created


def test_seq_length_message_says_whether_rope_scaling_allows_more(tiny_inputs, tmp_path, capsys, no_model_load):
    assert main(args_for(tiny_inputs, tmp_path / "out", "--seq-length", "513")) == 2
    assert "max_position_embeddings 512 (the model has no RoPE scaling in its config" in capsys.readouterr().err
    model = tmp_path / "scaled"
    shutil.copytree(tiny_inputs["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (model / "config.json").write_text(json.dumps(cfg))
    args = args_for(tiny_inputs, tmp_path / "out", "--seq-length", "513")
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 2
    assert "RoPE scaling 'linear' (factor 2.0) is already counted in it" in capsys.readouterr().err


def test_a_resume_or_an_overwrite_passes_the_save_check(tiny_inputs, tmp_path):
    from megatron_gem.training.args import job_config, parse_args

    save = tmp_path / "run"
    _another_run(save)
    job_config(parse_args(args_for(tiny_inputs, save, "--load", str(save))), world_size=1)
    job = job_config(parse_args(args_for(tiny_inputs, save, "--overwrite-output-dir")), world_size=1)
    assert job.checkpoint.overwrite


def test_summary_tokens_missing_are_refused_before_the_model_loads(tiny_inputs, tmp_path, capsys, monkeypatch):
    from megatron_gem.training.deepspeed_engine import DeepSpeedEngine

    forbid(monkeypatch, "the model load", (DeepSpeedEngine, "build"))
    # The tiny tokenizer has no unused special token to serve as the summary token.
    assert main(args_for(tiny_inputs, tmp_path / "out", "--gem-train", "summary")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: summary mode needs 1 existing unused token(s)") and "--gem-summary-tokens" in line, line
    assert main(args_for(tiny_inputs, tmp_path / "out", "--gem-train", "summary", "--gem-summary-tokens", "<|nope|>")) == 2
    assert "--gem-summary-tokens ['<|nope|>']: not in the tokenizer's vocabulary" in capsys.readouterr().err


def test_debug_shows_the_traceback(tiny_inputs, tmp_path, no_model_load):
    from megatron_gem.training.args import ArgumentError

    with pytest.raises(ArgumentError, match="--gem-num-special-tokens 0"):
        main(args_for(tiny_inputs, tmp_path / "out", "--gem-num-special-tokens", "0", "--debug"))


def test_a_real_process_writes_one_line_to_stderr(tiny_inputs, tmp_path):
    """The stream and the exit code as a shell sees them (stdout and stderr apart)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), *args_for(tiny_inputs, tmp_path / "out")[2:], "--model", "./no/such/model"],
        cwd=REPO,
        env=subprocess_env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["train.py: error: --model ./no/such/model: no such directory"], proc.stderr


@pytest.mark.parametrize("megatron", [False, True])
def test_every_flag_has_help_and_no_default_twice(megatron):
    import argparse

    from megatron_gem.training.args import build_megatron_parser, build_parser

    parser = build_megatron_parser() if megatron else build_parser()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings}: no help text"
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: [])" not in text
    entries = text.split("\n  -")
    twice = [e.split()[0] for e in entries if e.count("default") > 1 and "(default:" in e]
    assert not twice, twice


# ---- --save: another run's checkpoints, overwritten on request ---------------------------------


def test_overwrite_output_dir_replaces_only_what_the_manifests_list(tiny_inputs, tmp_path, capsys):
    """A real earlier run, then a new run in the same --save: refused without a flag (before:
    overwritten without a word); with --overwrite-output-dir the new run's checkpoint and export
    replace the old ones, and the user's files in --save and in hf/ stay."""
    save = tmp_path / "run"
    train = ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(save), "--seq-length", "64", "--micro-batch-size", "2",
             "--train-iters", "2", "--gem-contrastive-from-step", "1", "--save-interval", "2", "--log-interval", "1", "--no-progress"]  # fmt: skip
    assert launch(train + ["--seed", "1"], timeout=300).returncode == 0
    old = tree(save / "global_step2")
    (save / "notes.txt").write_text("precious")
    (save / "hf" / "notes.txt").write_text("also precious")
    proc = launch(train + ["--seed", "2"], timeout=300)
    assert proc.returncode == 2 and f"train.py: error: --save {save}: holds the checkpoints of another run" in proc.stdout
    proc = launch(train + ["--seed", "2", "--overwrite-output-dir"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    from megatron_gem.common.manifest import verify

    new = tree(save / "global_step2")
    assert (save / "latest").read_text().strip() == "global_step2" and verify(str(save / "global_step2"))
    assert new["mp_rank_00_model_states.pt"] != old["mp_rank_00_model_states.pt"]  # the new run's weights (another seed)
    assert (save / "notes.txt").read_text() == "precious" and (save / "hf" / "notes.txt").read_text() == "also precious"
    assert "notes.txt" not in verify(str(save / "hf"))["files"]  # kept, not adopted
    assert [m["step"] for m in read_metrics(save)] == [1, 2]  # the new run's records only
    leftovers = [p.name for p in save.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_unreadable_model_and_unwritable_save_are_named(tiny_inputs, tmp_path, capsys, monkeypatch, no_model_load):
    # As root everything is readable and writable; the checks rely on os.access, so ask it.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) in (tiny_inputs["model"], str(tmp_path)) else real(p, mode))
    assert main(args_for(tiny_inputs, tmp_path / "out")) == 2
    assert f"--model {tiny_inputs['model']}: directory is not readable (permission denied)" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert main(args_for(tiny_inputs, tmp_path / "out")) == 2
    assert f"--save {tmp_path / 'out'}: cannot write there ({tmp_path} is not writable)" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["--data", "--contrastive-data", "--valid-contrastive-data"])
def test_a_malformed_record_is_refused_before_the_model_loads(tiny_inputs, tmp_path, capsys, monkeypatch, which):
    """The training data is read before the engine builds the model (full mode: with the GEM
    tokens the engine will add), so a bad record costs seconds, not a model load."""
    from megatron_gem.training.deepspeed_engine import DeepSpeedEngine

    forbid(monkeypatch, "the model load", (DeepSpeedEngine, "build"))
    bad = tmp_path / "bad.jsonl"
    good = '{"text": "a fine line of text for the corpus"}' if which == "--data" else '{"query": "a question", "positive": "an answer"}'
    bad.write_text(f"{good}\n{good}\n{{not json\n")
    extra = ["--valid-data", tiny_inputs["data"], "--eval-interval", "2", "--eval-iters", "1"] if which == "--valid-contrastive-data" else []
    assert main(args_for(tiny_inputs, tmp_path / "out", which, str(bad), *extra)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: ") and f"{bad}:3" in line, line
