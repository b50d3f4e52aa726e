"""What the megatron-core training tests share (test_megatron_engine.py, test_megatron_summary.py):
train.py's arguments of a short two-phase run on the tiny checkpoint, and readers of what a run
writes (its metrics records, its HF export)."""

import json

import pytest

VOLATILE = ("tokens_per_s", "step_time_s")


def train_args(model, data, save, *extra):
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


def records(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def metrics(save):
    """The training records."""
    return [r for r in records(save) if "loss" in r]


def valid(save):
    """The validation records."""
    return [r for r in records(save) if "valid_ntp_loss" in r]


def close(a, b, rel=2e-5):
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k in VOLATILE or v is None or isinstance(v, str):
                assert v == rb[k] or k in VOLATILE, (k, ra, rb)
                continue
            assert rb[k] == pytest.approx(v, rel=rel, abs=1e-7), (ra["step"], k, v, rb[k])


def weights(directory, sub="hf"):
    """All tensors of an HF export (one file, or one shard per pipeline stage)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((directory / sub).glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {directory / sub}"
    return out


def write_corpus(directory):
    """corpus.jsonl (200 documents) and valid.jsonl (30 held-out ones, --valid-data) in directory."""
    from megatron_gem.testing import sample_sentences

    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(200, seed=5, min_words=8, max_words=30)))
    (path.parent / "valid.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(30, seed=6, min_words=8, max_words=30)))
    return path
