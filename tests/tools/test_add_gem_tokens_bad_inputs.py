"""tools/add_gem_tokens.py: one line on stderr, exit 2 for the input and 1 for a failed write,
nothing left behind; a non-empty --output only with --overwrite-output-dir, the user's files
kept (before: the whole target was renamed away and deleted)."""

import errno
import os

import pytest

from tests.bad_input import forbid, tree
from tests.bad_input import one_error_line as error_line
from tests.launch import load_tool


def run(*argv) -> int:
    return load_tool("add_gem_tokens").main(list(argv))


def one_error_line(err: str) -> str:
    return error_line(err, "add_gem_tokens.py")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--input {root}/missing: no such directory"),
        ("file", "--input {root}/file.txt: is a file"),
        ("k0", "--num-special-tokens 0: must be an integer >= 1"),
        ("template", "--special-token-template <gem>: must contain '{{i}}'"),
        ("taken", "--output {root}/taken: exists and is not empty"),
        ("same", "--output {model}: is --input {model}"),
    ],
)
def test_bad_input_table(tiny_inputs, tmp_path, capsys, monkeypatch, case, message):
    import transformers

    forbid(monkeypatch, "a tokenizer load", (transformers.AutoTokenizer, "from_pretrained"))
    root = tmp_path
    (root / "file.txt").write_text("x")
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("precious")
    model = tiny_inputs["model"]
    argv = {
        "missing": ["--input", str(root / "missing"), "--output", str(root / "o")],
        "file": ["--input", str(root / "file.txt"), "--output", str(root / "o")],
        "k0": ["--input", model, "--output", str(root / "o"), "--num-special-tokens", "0"],
        "template": ["--input", model, "--output", str(root / "o"), "--special-token-template", "<gem>"],
        "taken": ["--input", model, "--output", str(root / "taken")],
        "same": ["--input", model, "--output", model],
    }[case]
    before, model_before = tree(root), tree(model)
    assert run(*argv) == 2
    assert message.format(root=root, model=model) in one_error_line(capsys.readouterr().err)
    assert tree(root) == before and tree(model) == model_before


def test_a_full_disk_leaves_nothing(tiny_inputs, tmp_path, capsys, monkeypatch):
    from megatron_gem.mcore import lazy_checkpoint_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lazy_checkpoint_io.SafetensorsShardWriter, "add", full)
    assert run("--input", tiny_inputs["model"], "--output", str(tmp_path / "out")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'out'}: writing it failed" in line and "No space left on device" in line
    assert os.listdir(tmp_path) == []


def test_overwrite_keeps_the_users_files(tiny_inputs, tmp_path):
    out = tmp_path / "out"
    assert run("--input", tiny_inputs["model"], "--output", str(out)) == 0
    (out / "notes.txt").write_text("precious")
    assert run("--input", tiny_inputs["model"], "--output", str(out)) == 2
    assert run("--input", tiny_inputs["model"], "--output", str(out), "--overwrite-output-dir") == 0
    assert (out / "notes.txt").read_text() == "precious" and (out / "gem_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
