"""Fixtures of the training tests (launch helpers: train_launch.py)."""

import json

import pytest


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """A tiny HF checkpoint and a jsonl corpus, written once per session."""
    from megatron_gem.testing import sample_sentences, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_inputs")
    model = save_tiny_checkpoint(root / "model")
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for s in sample_sentences(300, seed=5):
            f.write(json.dumps({"text": s}) + "\n")
    return {"model": str(model), "data": str(data)}
