"""megatron-core GEM training on CPU/gloo: TP=2 x PP=2 and TP=2 x DP=2 (sequence parallel,
recomputation, distributed optimizer) give the single-process numbers, validation figures
included (every run validates on --valid-data after steps 2 and 4); exact resume; export."""

import json

import pytest
import torch

from tests.launch import run_torchrun

VOLATILE = ("tokens_per_s", "step_time_s")


def _args(model, data, save, *extra):
    return [
        "train.py",  # the user's entry: the parallelism flag below selects megatron-core
        "--model", str(model), "--data", str(data), "--save", str(save),
        "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "4", "--gem-contrastive-from-step", "2", "--gem-alpha", "0.5",
        "--contrastive-batch-size", "4", "--contrastive-max-length", "24",
        "--lr", "1e-3", "--contrastive-lr", "1e-3", "--log-interval", "1", "--save-interval", "2",
        "--attention-backend", "sdpa", "--no-progress", "--tensor-model-parallel-size", "1",
        "--valid-data", str(data.parent / "valid.jsonl"), "--eval-interval", "2", "--eval-iters", "1", *extra,
    ]  # fmt: skip


def _records(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def _metrics(save):
    """The training records."""
    return [r for r in _records(save) if "loss" in r]


def _valid(save):
    """The validation records."""
    return [r for r in _records(save) if "valid_ntp_loss" in r]


def _close(a, b, rel=2e-5):
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k in VOLATILE or v is None or isinstance(v, str):
                assert v == rb[k] or k in VOLATILE, (k, ra, rb)
                continue
            assert rb[k] == pytest.approx(v, rel=rel, abs=1e-7), (ra["step"], k, v, rb[k])


def _weights(directory, sub="hf"):
    """All tensors of an HF export (one file, or one shard per pipeline stage)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((directory / sub).glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {directory / sub}"
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_gem.testing import sample_sentences

    path = tmp_path_factory.mktemp("mg_data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(200, seed=5, min_words=8, max_words=30)))
    (path.parent / "valid.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(30, seed=6, min_words=8, max_words=30)))
    return path


@pytest.fixture(scope="module")
def reference(gem_hf_checkpoint, corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("mg_ref") / "run"
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1"))
    return save


def test_single_process_run_trains_and_exports(reference, gem_hf_checkpoint):
    from megatron_gem.gem.config import GEMConfig

    m = _metrics(reference)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and [r["phase"] for r in m] == [1, 1, 2, 2]
    assert m[1]["ntp_loss"] < m[0]["ntp_loss"] and m[2]["cl_loss"] is not None and m[2]["ntp_loss"] is not None
    assert m[3]["logit_scale"] != 20.0  # the InfoNCE scale is trained in phase 2
    v = _valid(reference)
    assert [r["step"] for r in v] == [2, 4]
    for r in v:  # 1 global batch: 4 rows of held-out documents, 4 micro-batches of 4 texts
        assert r["valid_ntp_tokens_plain"] > 0 and r["valid_ntp_tokens_gem"] > 0 and r["valid_cl_texts"] == 16
        assert r["valid_ntp_loss_plain"] > 0 and r["valid_ntp_loss_gem"] > 0 and 0 <= r["valid_cl_top1"] <= 1
    assert v[1]["valid_ntp_loss"] < v[0]["valid_ntp_loss"] and v[1]["valid_cl_loss"] < v[0]["valid_cl_loss"]
    assert (reference / "latest").read_text().strip() == "global_step4"
    hf = reference / "hf"
    assert GEMConfig.load(hf).special_token_ids == GEMConfig.load(gem_hf_checkpoint).special_token_ids
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf)
    w, w0 = _weights(reference), _weights(gem_hf_checkpoint, sub=".")
    assert sorted(w) == sorted(w0) and not torch.equal(w["model.norm.weight"], w0["model.norm.weight"])


def test_tp2_pp2_equals_single_process(reference, converted_checkpoint, corpus, tmp_path):
    """4 processes, TP=2 x PP=2 (1F1B schedule), started from the converted dist checkpoint."""
    save = tmp_path / "tp2pp2"
    run_torchrun(_args(converted_checkpoint, corpus, save, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"), nproc=4)
    _close(_metrics(reference), _metrics(save))
    _close(_valid(reference), _valid(save))  # forward-only 1F1B pipeline, vocab-parallel cross-entropy
    a, b = _weights(reference), _weights(save)
    assert sorted(a) == sorted(b) and len(list((save / "hf").glob("model-0000*-of-00002.safetensors"))) == 2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    # The 4-rank training checkpoint (model + distributed optimizer, megatron-core's own writer)
    # converts offline, tensor by tensor, to exactly the weights the run exported live.
    from tests.launch import run_python

    run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(save / "global_step4"), "--output", str(tmp_path / "offline")])
    c = _weights(tmp_path, sub="offline")
    assert sorted(c) == sorted(b) and all(torch.equal(c[k], b[k]) for k in b)


def test_tp2_dp2_sequence_parallel_recompute_equals_single_process(reference, gem_hf_checkpoint, corpus, tmp_path):
    """4 processes, TP=2 x DP=2 with sequence parallelism, full recomputation and the
    distributed optimizer; phase 1 (phase 2's in-batch negatives grow with DP by design)."""
    save = tmp_path / "tp2dp2"
    extra = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "full", "--train-iters", "2"]
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, *extra), nproc=4)
    _close(_metrics(reference)[:2], _metrics(save))
    # validation's NTP figures over the two replicas (sums and counts); the contrastive ones see
    # 8 in-batch candidates instead of 4, by design
    ntp = ("valid_ntp_loss", "valid_ntp_loss_plain", "valid_ntp_loss_gem", "valid_ntp_tokens_plain", "valid_ntp_tokens_gem", "valid_cl_texts")
    _close([{k: r[k] for k in ntp} for r in _valid(reference)[:1]], _valid(save))


def test_exact_resume(reference, gem_hf_checkpoint, corpus, tmp_path):
    """Also: validation leaves training untouched. The first leg does not validate
    (--eval-iters 0); the reference validated after step 2, yet steps 3 and 4 are the same."""
    save = tmp_path / "resume"
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1", "--exit-after-iters", "2", "--eval-iters", "0"))
    assert (save / "latest").read_text().strip() == "global_step2" and not (save / "hf").exists()
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1", "--load", str(save)))
    ref, got = _metrics(reference), _metrics(save)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for ra, rb in zip(ref, got):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    assert _valid(save) == _valid(reference)[1:]  # step 4's, on the resumed weights
    a, b = _weights(reference), _weights(save)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_pairs_in_phase_two(reference, gem_hf_checkpoint, tmp_path, corpus):
    """--contrastive-data through megatron-core: phase 1 unchanged, phase 2 trains on the pairs."""
    from megatron_gem.testing import sample_sentences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"item {i}", "positive": s}) + "\n" for i, s in enumerate(sample_sentences(40, seed=8))))
    save = tmp_path / "pairs_run"
    proc = run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--contrastive-data", str(pairs)))
    assert "phase-2 pairs (40)" in proc.stdout and "[pairs] documents skipped: 0" in proc.stdout, proc.stdout[-3000:]
    ref, m = _metrics(reference), _metrics(save)
    _close(ref[:2], m[:2])
    assert [r["phase"] for r in m] == [1, 1, 2, 2]
    assert all(abs(a["cl_loss"] - b["cl_loss"]) > 1e-3 for a, b in zip(ref[2:], m[2:]))


def test_tp2_nan_on_one_rank_stops_all_and_damaged_checkpoints_are_refused(reference, gem_hf_checkpoint, corpus, tmp_path):
    """TP=2: a NaN loss on rank 1 at step 3 stops both ranks before saving (latest stays at
    step 2); resuming without the fault gives the uninterrupted numbers; then a flipped byte in
    the step-4 checkpoint is refused naming the file, and the fallback is step 2."""
    save = tmp_path / "tp2"
    args = _args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "2")
    args[0] = "tests/training/fault_train.py"
    proc = run_torchrun(args, nproc=2, check=False, env={"MG_FAULT": "nan@3:1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "step 3 (phase 2): non-finite loss on rank(s) 1," in errors[0], proc.stdout[-3000:]
    assert "still names global_step2" in errors[0]
    assert (save / "latest").read_text().strip() == "global_step2" and not (save / "global_step4").exists()
    args[0] = "train.py"
    run_torchrun(args + ["--load", str(save)], nproc=2)
    _close(_metrics(reference), _metrics(save))
    _close(_valid(reference), _valid(save))  # TP=2: step 2's from the failed run, step 4's after the resume

    # What --load does first (the trainer's resolve_checkpoint, shared by both engines; the
    # DeepSpeed tests run it through train.py): a flipped byte in a shard is refused naming the
    # shard, and the fallback is the newest earlier complete checkpoint.
    from megatron_gem.common.manifest import CheckpointError
    from megatron_gem.training.checkpoint import resolve_checkpoint

    shard = max((save / "global_step4").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content does not match its sha256") as e:
        resolve_checkpoint(str(save), log=lambda *_: None)
    assert str(shard) in str(e.value)
    assert resolve_checkpoint(str(save), fallback=True, log=lambda *_: None) == "global_step2"
