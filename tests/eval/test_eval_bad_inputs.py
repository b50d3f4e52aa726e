"""tools/eval_mteb.py and tools/eval_lm.py under bad input: one line on stderr naming the flag or
file, exit 2, no model loaded before the check (the loaders are replaced by ones that fail the
test), nothing touched; --output replaced only with --overwrite-output-dir, the user's files kept.
Before: every model-folder error was a traceback (only ModelLoadError was caught) and a
mistyped --model went to the hub."""

import json
import os
import shutil

import pytest

from tests.bad_input import forbid, one_error_line, tree
from tests.launch import load_tool


@pytest.fixture(scope="module")
def gem_dir(tmp_path_factory):
    from megatron_gem import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer

    d = tmp_path_factory.mktemp("gem_eval_inputs") / "gem"
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    cfg = GEMConfig(num_special_tokens=1)
    add_gem_tokens(model, tok, cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg.save(d)
    return str(d)


def _forbid_model_load(monkeypatch):
    import transformers

    import megatron_gem.eval.mteb_model as mm

    forbid(monkeypatch, "a model load", (mm, "load_mteb_model"), (transformers.AutoModelForCausalLM, "from_pretrained"))


def _cases(root, gem_dir, tiny_inputs):
    empty = root / "empty"
    empty.mkdir()
    (root / "file.txt").write_text("x")
    taken = root / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("precious")
    loop = root / "loop"
    os.symlink(loop, loop)
    out = str(root / "out")
    plain = tiny_inputs["model"]  # an HF causal LM without gem_config.json
    return {
        "model missing": (["--model", str(root / "missing"), "--output", out], f"--model {root / 'missing'}: no such directory"),
        "model a file": (["--model", str(root / "file.txt"), "--output", out], "file.txt: is a file; expected a checkpoint directory"),
        "model empty": (["--model", str(empty), "--output", out], f"--model {empty}: is empty: no config.json, no tokenizer files"),
        "model a link loop": (["--model", str(loop), "--output", out], "link loop"),
        "plain HF folder, method gem": (["--model", plain, "--output", out], f"--model {plain}: no gem_config.json, so not a GEM checkpoint"),
        "method mean, typo path": (["--model", "./no/model", "--method", "mean", "--output", out], "--model ./no/model: no such directory"),
        "method mean, offline repo id": (["--model", "org/not-cached", "--method", "mean", "--output", out], "the hub is off"),
        "base missing": (["--model", gem_dir, "--base", str(root / "nobase"), "--output", out], f"--base {root / 'nobase'}: no such directory"),
        "output a file": (["--model", gem_dir, "--output", str(root / "file.txt")], "file.txt: is a file; expected a directory"),
        "output non-empty": (["--model", gem_dir, "--output", str(taken)], f"--output {taken}: exists and is not empty"),
        "output inside the model": (["--model", gem_dir, "--output", os.path.join(gem_dir, "results")], "write the output elsewhere"),
        "update card of a plain model": (["--model", plain, "--method", "mean", "--update-model-card", "--output", out], "--update-model-card: --model"),
        "unknown task": (["--model", gem_dir, "--tasks", "NoSuchTaskAnywhere", "--output", out], "--tasks NoSuchTaskAnywhere: unknown task or benchmark"),
        "scale 0": (["--model", gem_dir, "--scale", "0", "--output", out], "--scale 0.0: must lie in (0, 1]"),
    }


CASES = ["model missing", "model a file", "model empty", "model a link loop", "plain HF folder, method gem", "method mean, typo path",
         "method mean, offline repo id", "base missing", "output a file", "output non-empty", "output inside the model",
         "update card of a plain model", "unknown task", "scale 0"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_eval_mteb_bad_input_table(gem_dir, tiny_inputs, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    root = tmp_path / "work"
    root.mkdir()
    argv, message = _cases(root, gem_dir, tiny_inputs)[case]
    _forbid_model_load(monkeypatch)
    before, model_before = tree(root), tree(gem_dir)
    assert load_tool("eval_mteb").main([*argv, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert message in one_error_line(err, "eval_mteb") and "error" not in out
    assert tree(root) == before and tree(gem_dir) == model_before


def test_a_truncated_weights_file_is_named(gem_dir, tmp_path, capsys):
    """No manifest to catch it first: the loader's error names the file (before: a
    SafetensorError traceback without a path)."""
    model = tmp_path / "gem"
    shutil.copytree(gem_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert load_tool("eval_mteb").main(["--model", str(model), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("eval_mteb: error: ") and f"{weights}: not a readable safetensors file" in line, line
    assert not (tmp_path / "out").exists()


def test_eval_lm_refuses_in_one_line(tiny_inputs, tmp_path, capsys, monkeypatch):
    _forbid_model_load(monkeypatch)
    tool = load_tool("eval_lm")
    assert tool.main(["--model", "./no/model", "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "eval_lm: error: --model ./no/model: no such directory"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("precious")
    assert tool.main(["--model", tiny_inputs["model"], "--output", str(tmp_path / "taken")]) == 2
    assert "--output" in capsys.readouterr().err and (tmp_path / "taken" / "notes.txt").read_text() == "precious"


def test_overwrite_output_dir_keeps_the_users_files(gem_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", gem_dir, "--tasks", "SimLex999", "--scale", "0.03", "--max-length", "64", "--output", str(out), "--no-progress"]
    tool = load_tool("eval_mteb")
    assert tool.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "notes.txt").write_text("precious")
    (out / "summary.json").write_text("{}")  # ours: the next run replaces it
    assert tool.main(args) == 2  # not without the flag
    assert tool.main(args + ["--overwrite-output-dir"]) == 0
    assert (out / "notes.txt").read_text() == "precious"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_config_that_is_not_text_and_an_unwritable_output(gem_dir, tmp_path, capsys, monkeypatch):
    model = tmp_path / "gem"
    shutil.copytree(gem_dir, model)
    (model / "config.json").write_bytes(b"\xff\xfe\x00 not json")
    tool = load_tool("eval_mteb")
    assert tool.main(["--model", str(model), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "eval_mteb")
    assert str(model) in line and "cannot load it" in line, line
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert tool.main(["--model", gem_dir, "--output", str(tmp_path / "new" / "out"), "--no-progress"]) == 2
    assert f"--output {tmp_path / 'new' / 'out'}: cannot create it ({tmp_path} is not writable)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gem"]
