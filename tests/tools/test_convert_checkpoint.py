"""tools/convert_checkpoint.py: every checkpoint train.py's DeepSpeed engine writes converts (a
round trip against the run's own export, per engine configuration); the converter never
removes a file it did not write; bad input ends in one line, exit 2 (input) or 1 (the work),
before any heavy work. The megatron side (train.py's megatron-core checkpoints, fp32, full and
summary mode) is converted in tests/training/test_megatron_engine.py."""

import errno
import json
import os
import shutil

import pytest
import torch

from tests.bad_input import forbid, tree
from tests.bad_input import one_error_line as error_line
from tests.launch import launch, load_tool

TRAIN = ["--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "2", "--gem-contrastive-from-step", "1", "--save-interval", "2",
         "--lr", "1e-3", "--contrastive-lr", "1e-3", "--no-progress", "--seed", "3"]  # fmt: skip
ZERO = {s: {"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": s}} for s in (1, 2)}  # fmt: skip
# The engine configurations train.py's DeepSpeed engine writes checkpoints with (ZeRO stage,
# precision, train mode). ZeRO-3 in fp32 is tests/mcore/test_deepspeed_to_hf.py's run. ZeRO-3
# with --bf16 is missing: train.py stops in deepspeed.initialize there on this machine (DeepSpeed's
# defragment asserts a single dtype: the fp32 logit scale beside bf16 weights), so it writes no
# checkpoint to convert.
KINDS = {
    "zero0": ([], "full"),  # no --deepspeed: the default run
    "zero0-bf16": (["--bf16"], "full"),
    "zero1": (["--deepspeed", "{z1}"], "full"),
    "zero2-bf16": (["--deepspeed", "{z2}", "--bf16"], "full"),
    "summary-zero0": (["--gem-train", "summary"], "summary"),
    "summary-zero2-bf16": (["--gem-train", "summary", "--deepspeed", "{z2}", "--bf16"], "summary"),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from megatron_gem.testing import save_tiny_checkpoint, save_tiny_reserved_base

    root = tmp_path_factory.mktemp("convert_bases")
    configs = {}
    for s, cfg in ZERO.items():
        configs[f"z{s}"] = str(root / f"z{s}.json")
        (root / f"z{s}.json").write_text(json.dumps(cfg))
    return {"full": save_tiny_checkpoint(root / "full"), "summary": save_tiny_reserved_base(root / "summary"), **configs}


@pytest.fixture(scope="module")
def runs(bases, tiny_inputs, tmp_path_factory):
    """kind -> (the run's --save, its --model): each run trained once, when a test first asks."""
    root, done = tmp_path_factory.mktemp("convert_runs"), {}

    def get(kind):
        if kind not in done:
            extra, mode = KINDS[kind]
            save = root / kind
            args = ["--model", bases[mode], "--data", tiny_inputs["data"], "--save", str(save), *TRAIN, *[a.format(**bases) for a in extra]]
            proc = launch(args, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:]
            done[kind] = (save, bases[mode])
        return done[kind]

    return get


def convert(*argv) -> int:
    return load_tool("convert_checkpoint").main(list(argv))


def one_error_line(err: str) -> str:
    return error_line(err, "convert_checkpoint.py")


# ZeRO-1 writes the optimizer-state files ZeRO-2 does (one reader, make test's through
# zero2-bf16): make test-long.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.long) if k == "zero1" else k for k in sorted(KINDS)])
def test_every_deepspeed_checkpoint_round_trips(runs, kind, tmp_path):
    """The consolidated weights are the ones the run exported itself (SAVE/hf, written from the
    live model): bit-equal in fp32; with --bf16 the fp32 master weights round to the export's
    bf16 ones. Summary mode gives the same adapter folder. Before: ZeRO-0 raised
    "TypeError: 'NoneType' object is not iterable" and summary mode "no 'lm.*' parameters"."""
    from safetensors.torch import load_file

    save, model = runs(kind)
    out = tmp_path / "hf"
    assert convert("deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(out)) == 0
    if KINDS[kind][1] == "summary":
        exported, got = load_file(save / "hf" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        assert any(float(t.abs().max()) > 0 for k, t in exported.items() if "lora_B" in k)  # it trained: not the zero init
        if "bf16" not in kind:  # the same weights: the same embeddings through the adapter folder's loader
            from megatron_gem import GEMEmbedder

            texts = ["a cat sleeps under the tree", "the river runs fast"]
            assert torch.equal(GEMEmbedder.from_pretrained(str(out)).encode(texts), GEMEmbedder.from_pretrained(str(save / "hf")).encode(texts))
    else:
        exported, got = load_file(save / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
        if "bf16" in kind:
            assert any(not torch.equal(t, t.bfloat16().float()) for t in got.values())  # the fp32 masters, not the bf16 copies upcast
    assert sorted(exported) == sorted(got)
    for k in exported:
        assert torch.equal(exported[k], got[k].to(exported[k].dtype)), k
    from megatron_gem.common.manifest import verify

    assert "manifest.json" not in verify(str(out))["files"]


class _Payload:
    """What a hostile checkpoint could pickle: unpickling it would run ``open(path, "w")``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unread(runs, tmp_path, capsys):
    """ZeRO-1/2/3 files go through DeepSpeed's zero_to_fp32, which loads them with
    ``weights_only=False``: a pickled callable in an optimizer-state file would run. The converter
    reads every file weights-only, so the payload never runs and the file is refused in one line.
    Before: the payload ran (the marker file appeared) and the conversion went on."""
    save, model = runs("zero1")
    hostile = tmp_path / "hostile"
    shutil.copytree(save, hostile)
    (hostile / "global_step2" / "manifest.json").unlink()
    optim = next((hostile / "global_step2").glob("*_optim_states.pt"))
    state = torch.load(optim, map_location="cpu", weights_only=False)  # the test's own file
    marker = tmp_path / "payload_ran"
    state["optimizer_state_dict"]["extra"] = _Payload(str(marker))
    torch.save(state, optim)
    assert convert("deepspeed-to-hf", "--input", str(hostile), "--model", model, "--output", str(tmp_path / "hf")) == 1
    assert not marker.exists()
    line = one_error_line(capsys.readouterr().err)
    assert str(hostile / "global_step2") in line and "refusing to load" in line
    assert not (tmp_path / "hf").exists()


# ---- never removes what it did not write -------------------------------------------------------


def test_output_holding_the_users_files(runs, tmp_path, capsys):
    """A non-empty --output is refused (before: replaced, its files deleted, exit 0); with
    --overwrite-output-dir an earlier conversion is replaced and the user's files stay."""
    save, model = runs("zero0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    args = ["deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(out)]
    assert convert(*args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"convert_checkpoint.py: error: --output {out}: exists and is not empty") and "--overwrite-output-dir" in line
    assert os.listdir(out) == ["notes.txt"]
    assert convert(*args, "--overwrite-output-dir") == 0  # the user's file is kept beside the conversion
    assert (out / "notes.txt").read_text() == "precious" and (out / "model.safetensors").is_file()
    (out / "model.safetensors").write_bytes(b"stale")  # ours (listed): replaced by the next conversion
    assert convert(*args, "--overwrite-output-dir") == 0
    assert (out / "notes.txt").read_text() == "precious" and (out / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left beside it


def test_a_full_disk_during_conversion_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    import megatron_gem.hf.deepspeed_checkpoint as ds

    save, model = runs("zero0")
    before = tree(save)

    def full(root, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(root, "manifest.json"))

    monkeypatch.setattr(ds, "write_manifest", full)  # the last write of the conversion
    assert convert("deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(tmp_path / "out")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'out'}: writing it failed" in line and "No space left on device" in line, line
    assert os.listdir(tmp_path) == [] and tree(save) == before


# ---- bad input: one line, the right code, before any heavy work --------------------------------


def _bad_inputs(root, save, model):
    """name -> (argv, exit code, what the one line must say). ``save``: a copy of a zero0 run."""
    (root / "file.txt").write_text("not a checkpoint")
    empty = root / "empty"
    empty.mkdir()
    loop = root / "loop"
    os.symlink(loop, loop)
    plain = root / "plain_hf"
    plain.mkdir()
    shutil.copy(os.path.join(model, "config.json"), plain)  # config, no weights
    garbage = root / "garbage_run"  # a train.py save whose files were replaced, manifest gone
    shutil.copytree(save, garbage)
    (garbage / "global_step2" / "manifest.json").unlink()
    (garbage / "global_step2" / "mp_rank_00_model_states.pt").write_text("12 not a torch file\n")
    zero = root / "zero_byte_run"
    shutil.copytree(save, zero)
    (zero / "global_step2" / "manifest.json").unlink()
    (zero / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    truncated = root / "truncated_run"
    shutil.copytree(save, truncated)
    states = truncated / "global_step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:4096])
    badlatest = root / "bad_latest_run"
    shutil.copytree(save, badlatest)
    (badlatest / "latest").write_bytes(b"\xff\xfe\x00garbage")
    nolatest = root / "no_latest_run"
    shutil.copytree(save, nolatest)
    (nolatest / "latest").unlink()
    taken = root / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("precious")
    out = str(root / "out")
    ds = ["deepspeed-to-hf", "--model", model, "--output", out, "--input"]
    return {
        "input missing": (["megatron-to-hf", "--input", str(root / "missing"), "--output", out], 2, f"--input {root / 'missing'}: no such directory"),
        "input a file": (["megatron-to-hf", "--input", str(root / "file.txt"), "--output", out], 2, "file.txt: is a file; expected a checkpoint directory"),
        "input a link loop": (["hf-to-megatron", "--input", str(loop), "--output", out], 2, "link loop"),
        "input empty": (["hf-to-megatron", "--input", str(empty), "--output", out], 2, f"--input {empty}: is empty: no config.json"),
        "input without weights": (["hf-to-megatron", "--input", str(plain), "--output", out], 2, "no weights (model.safetensors"),
        "not a megatron checkpoint": (
            ["megatron-to-hf", "--input", str(save), "--output", out],
            2,
            "no megatron_gem.json; not a megatron-core checkpoint of megatron-gem (a --save directory: give one of its global_stepN)",
        ),
        "not a deepspeed save": (ds + [str(empty)], 2, f"--input {empty}: no 'latest' file"),
        "no latest": (ds + [str(nolatest)], 2, "no 'latest' file naming a checkpoint (it holds global_step2: pass --tag)"),
        "latest not UTF-8": (ds + [str(badlatest)], 2, f"{badlatest / 'latest'}: does not name a checkpoint"),
        "no such tag": (ds + [str(save), "--tag", "global_step9"], 2, "checkpoint 'global_step9' does not exist there"),
        "model a typo path": (
            ["deepspeed-to-hf", "--input", str(save), "--model", "./no/such/base", "--output", out],
            2,
            "--model ./no/such/base: no such directory",
        ),
        "model offline repo id": (["deepspeed-to-hf", "--input", str(save), "--model", "org/not-cached", "--output", out], 2, "the hub is off"),
        "output a file": (
            ["deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(root / "file.txt")],
            2,
            "file.txt: is a file; expected a directory",
        ),
        "output non-empty": (
            ["deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(taken)],
            2,
            f"--output {taken}: exists and is not empty",
        ),
        "output is the input": (["deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(save / "hf")], 2, "is --input"),
        "truncated, manifest": (ds + [str(truncated)], 1, f"{states}: 4096 bytes, manifest.json says"),
        "garbage .pt": (ds + [str(garbage)], 1, f"{garbage / 'global_step2' / 'mp_rank_00_model_states.pt'}: unreadable"),
        "0-byte .pt": (ds + [str(zero)], 1, f"{zero / 'global_step2' / 'mp_rank_00_model_states.pt'}: unreadable"),
    }


CASES = ["input missing", "input a file", "input a link loop", "input empty", "input without weights", "not a megatron checkpoint", "not a deepspeed save",
         "no latest", "latest not UTF-8", "no such tag", "model a typo path", "model offline repo id", "output a file", "output non-empty",
         "output is the input", "truncated, manifest", "garbage .pt", "0-byte .pt"]  # fmt: skip
HEAVY = {"truncated, manifest", "garbage .pt", "0-byte .pt"}  # found by reading the checkpoint (its first file), still before any model


@pytest.mark.parametrize("case", CASES)
def test_bad_input_table(runs, tmp_path, capsys, monkeypatch, case):
    save, model = runs("zero0")
    root = tmp_path / "work"
    root.mkdir()
    copy = root / "run"
    shutil.copytree(save, copy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    argv, code, message = _bad_inputs(root, copy, model)[case]
    # The time to fail is bounded by construction: a model load, megatron-core (and, but for
    # the damaged-file cases, any checkpoint read) fails the test.
    (_forbid_model_load if case in HEAVY else _forbid_heavy_work)(monkeypatch)
    before = tree(root)
    assert convert(*argv) == code
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err) and "error" not in captured.out
    assert tree(root) == before  # nothing anywhere was touched, the output included
    assert not os.path.exists(root / "out")


def _forbid_model_load(monkeypatch):
    import transformers

    from megatron_gem.mcore import runtime

    targets = [(runtime, "init_model_parallel"), (transformers.AutoModelForCausalLM, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_config")]
    forbid(monkeypatch, "a model load or megatron-core", *targets)


def _forbid_heavy_work(monkeypatch):
    import megatron_gem.hf.deepspeed_checkpoint as ds

    _forbid_model_load(monkeypatch)
    forbid(monkeypatch, "reading the checkpoint", (ds, "deepspeed_state"))


def test_permission_denied_on_the_input_is_named(runs, tmp_path, capsys, monkeypatch):
    # As root every directory is readable; the check relies on os.access, so ask it.
    save, model = runs("zero0")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == model else real(p, mode))
    _forbid_heavy_work(monkeypatch)
    assert convert("deepspeed-to-hf", "--input", str(save), "--model", model, "--output", str(tmp_path / "o")) == 2
    assert f"--model {model}: directory is not readable (permission denied)" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    from megatron_gem.common.errors import InputError

    with pytest.raises(InputError, match="no such directory"):
        convert("megatron-to-hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--debug")


# ---- the megatron side (megatron-core runs only in subprocesses) -------------------------------


def _megatron_to_hf(src, out, *extra):
    from tests.launch import run_python

    return run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(src), "--output", str(out), *extra], check=False, timeout=300)


def _error_line(proc) -> str:
    return one_error_line(proc.stderr)


def test_megatron_checkpoint_damaged_files_are_named(converted_checkpoint, tmp_path):
    """A garbage data file or .metadata (no manifest to catch it first): exit 1, the file named
    (before: a 60-line DCP traceback, or "could not find MARK" without a path)."""
    data = tmp_path / "data"
    shutil.copytree(converted_checkpoint, data)
    (data / "manifest.json").unlink(missing_ok=True)
    victim = sorted(p.name for p in data.iterdir() if p.suffix == ".distcp")[3]
    (data / victim).write_text("12abc not a tensor\n")
    proc = _megatron_to_hf(data, tmp_path / "out")
    assert proc.returncode == 1 and _error_line(proc).startswith(f"convert_checkpoint.py: error: {data / victim}: unreadable")
    meta = tmp_path / "meta"
    shutil.copytree(converted_checkpoint, meta)
    (meta / "manifest.json").unlink(missing_ok=True)
    (meta / ".metadata").write_text("12abc\n")
    proc = _megatron_to_hf(meta, tmp_path / "out")
    assert proc.returncode == 1 and _error_line(proc).startswith(f"convert_checkpoint.py: error: {meta / '.metadata'}: unreadable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "meta"]  # no output, no temporary directory


def test_megatron_to_hf_overwrite_keeps_the_users_files(converted_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    proc = _megatron_to_hf(converted_checkpoint, out, "--overwrite-output-dir")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "precious" and (out / "model.safetensors").is_file()
    from megatron_gem.common.manifest import verify

    assert "notes.txt" not in verify(str(out))["files"]
