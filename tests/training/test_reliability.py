"""What clusters do to runs (DeepSpeed engine): a non-finite step, a damaged or incomplete
checkpoint, a full disk mid-save, a --load path with nothing in it."""

import os
import shutil

import pytest

from tests.launch import FAULT_TRAIN, REPO, base_args, launch, read_metrics

DS_ZERO3 = os.path.join(REPO, "ds_zero3.json")
VOLATILE = ("tokens_per_s", "step_time_s")
# 2 ranks x 2 rows (the 2-process ZeRO-3 set-up of test_deepspeed_engine), 4 steps (phase 2 is
# step 4), checkpoints at steps 2 and 4.
DP2 = {"--deepspeed": DS_ZERO3, "--micro-batch-size": 2, "--contrastive-batch-size": 4, "--train-iters": 4, "--save-interval": 2}


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def same_run(a, b):
    """Step records equal in everything but timing (fp32 on CPU: a resume is exact)."""
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]


def error_line(out):
    lines = [line for line in out.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, out[-4000:]  # one message, not one per rank
    return lines[0]


@pytest.fixture(scope="module")
def full_disk_run(tiny_inputs, tmp_path_factory):
    """A 2-process ZeRO-3 run whose last save (step 4) hits a full disk on rank 1, inside
    DeepSpeed's save (its ZeRO optimizer-state file). Every step before the save ran normally,
    so its metrics are the uninterrupted run's: the reference of the resume tests below."""
    save = tmp_path_factory.mktemp("full_disk") / "run"
    proc = launch(
        base_args(tiny_inputs, save, **DP2), nproc=2, launcher="deepspeed", script=FAULT_TRAIN, env={"MG_FAULT": "enospc@4:1:optim_states"}, timeout=180
    )
    metrics = read_metrics(save)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4], proc.stdout[-3000:]
    return save, proc, metrics


@pytest.mark.multiprocess
def test_write_error_mid_save_stops_every_rank_and_keeps_the_previous_checkpoint(full_disk_run, tiny_inputs):
    save, proc, uninterrupted = full_disk_run
    assert proc.returncode != 0
    line = error_line(proc.stdout)
    assert f"saving checkpoint {save / 'global_step4'} failed on rank 1" in line and "No space left on device" in line, line
    assert (save / "latest").read_text().strip() == "global_step2"
    assert not (save / "global_step4").exists() and not (save / "hf").exists()  # the half-written save is removed (the disk is full)
    ok(launch(base_args(tiny_inputs, save, **DP2) + ["--load", str(save)], nproc=2, launcher="deepspeed"))
    same_run(uninterrupted, read_metrics(save))


# long (make test-long): a failure on one rank stopping every rank is make test's through the
# full disk above (this engine) and test_megatron_engine's TP=2 NaN (the same trainer check).
@pytest.mark.long
@pytest.mark.multiprocess
def test_nan_on_one_rank_stops_every_rank_before_saving(full_disk_run, tiny_inputs, tmp_path):
    # What is left is the step-2 checkpoint of an ordinary run; resuming from exactly that is
    # the full-disk test's resume above (2 processes, the same uninterrupted numbers).
    uninterrupted = full_disk_run[2]
    save = tmp_path / "nan"
    args = base_args(tiny_inputs, save, **DP2)
    proc = launch(args, nproc=2, launcher="deepspeed", script=FAULT_TRAIN, env={"MG_FAULT": "nan@3:1"})
    assert proc.returncode != 0
    line = error_line(proc.stdout)
    assert "step 3 (phase 1): non-finite loss on rank(s) 1," in line and "still names global_step2" in line, line
    assert (save / "latest").read_text().strip() == "global_step2"
    assert not (save / "global_step4").exists() and not (save / "hf").exists()
    assert [m["step"] for m in read_metrics(save)] == [1, 2, 3]  # the bad step is logged, then nothing
    same_run(uninterrupted[:2], read_metrics(save)[:2])  # the steps before the fault ran as normal


# ---- damaged checkpoints (one process) ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tiny_inputs, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4, started with a --load
    directory that holds no checkpoint (a first SLURM submission): it must say so and start
    fresh."""
    save = tmp_path_factory.mktemp("saved_run") / "run"
    empty = tmp_path_factory.mktemp("nothing_to_load")
    proc = ok(launch(base_args(tiny_inputs, save, **{"--train-iters": 4, "--gem-contrastive-from-step": 2, "--save-interval": 2, "--load": str(empty)})))
    said = [line for line in proc.stdout.splitlines() if f"--load {empty}" in line]
    assert len(said) == 1 and "no checkpoint there" in said[0] and "starting from step 0" in said[0], proc.stdout[-3000:]
    assert "steps 0->4" in proc.stdout
    return save


def _damage_truncate(ckpt):
    path = max((p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _damage_flip(ckpt):
    path = max((p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _damage_delete(ckpt):
    path = next(p for p in sorted(ckpt.rglob("rng_state_rank0.pt")))
    path.unlink()
    return path


def _damage_manifest(ckpt):
    path = ckpt / "manifest.json"
    path.unlink()
    return path


DAMAGES = {"truncated": _damage_truncate, "flipped-byte": _damage_flip, "missing-file": _damage_delete, "missing-manifest": _damage_manifest}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_checkpoint_is_refused_naming_the_file(saved_run, tmp_path, kind):
    # What --load does before loading anything (resolve_checkpoint), on a real training save.
    from megatron_gem.common.manifest import CheckpointError
    from megatron_gem.training.checkpoint import resolve_checkpoint

    save = tmp_path / "run"
    shutil.copytree(saved_run, save)
    bad = DAMAGES[kind](save / "global_step4")
    with pytest.raises(CheckpointError, match="checkpoint global_step4 refused") as e:
        resolve_checkpoint(str(save))
    assert str(bad) in str(e.value)
    said = []
    assert resolve_checkpoint(str(save), fallback=True, log=said.append) == "global_step2"
    assert "global_step4 refused" in said[0] and "falling back to global_step2" in said[1]


def test_train_refuses_a_damaged_checkpoint_and_falls_back_when_asked(saved_run, tiny_inputs, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(saved_run, save)
    bad = _damage_flip(save / "global_step4")
    args = base_args(tiny_inputs, save, **{"--train-iters": 4, "--gem-contrastive-from-step": 2, "--save-interval": 2, "--load": str(save)})
    proc = launch(args)
    assert proc.returncode == 1, proc.stdout[-3000:]
    line = error_line(proc.stdout)
    assert "checkpoint global_step4 refused" in line and f"{bad}: content does not match its sha256" in line, line
    proc = ok(launch(args + ["--load-fallback"]))
    assert "checkpoint global_step4 refused" in proc.stdout and "falling back to global_step2" in proc.stdout
    assert "steps 2->4" in proc.stdout
    same_run(read_metrics(saved_run), read_metrics(save))


def test_every_save_has_a_manifest_and_the_export_verifies(saved_run):
    from megatron_gem.common.manifest import verify

    for sub in ("global_step2", "global_step4", "hf"):
        files = verify(str(saved_run / sub))["files"]
        assert files and "manifest.json" not in files
    assert {"mp_rank_00_model_states.pt", "rng_state_rank0.pt"} <= set(verify(str(saved_run / "global_step4"))["files"])
    assert "model.safetensors" in verify(str(saved_run / "hf"))["files"]


def test_damaged_export_is_refused_by_the_embedder(saved_run, tmp_path):
    from megatron_gem import GEMEmbedder
    from megatron_gem.common.manifest import CheckpointError

    hf = tmp_path / "hf"
    shutil.copytree(saved_run / "hf", hf)
    weights = hf / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: content does not match"):
        GEMEmbedder.from_pretrained(str(hf))
    GEMEmbedder.from_pretrained(str(hf), verify=False)  # the user can still insist


def test_verify_checkpoint_tool(saved_run, tmp_path):
    import subprocess
    import sys

    tool = [sys.executable, os.path.join(REPO, "tools", "verify_checkpoint.py")]
    run = lambda *a: subprocess.run([*tool, *a], capture_output=True, text=True, cwd=REPO)  # noqa: E731
    good = run(str(saved_run), "--all")
    assert good.returncode == 0 and good.stdout.count("ok ") == 3, good.stdout + good.stderr
    save = tmp_path / "run"
    shutil.copytree(saved_run, save)
    (save / "global_step2" / "manifest.json").unlink()
    bad = run(str(save), "--all")
    assert bad.returncode == 1 and "REFUSED" in bad.stdout and "global_step2" in bad.stdout and bad.stdout.count("ok ") == 2


def test_load_without_a_checkpoint_says_so(tmp_path):
    from megatron_gem.training.checkpoint import resolve_checkpoint

    for load in (tmp_path / "missing", tmp_path):
        said = []
        assert resolve_checkpoint(str(load), log=said.append) is None
        assert len(said) == 1 and f"--load {load}:" in said[0] and "starting from step 0" in said[0]
