"""tools/bench_loss.py: fake tensors against real ones at a small shape, and the last-line JSON
(the 8B-head figures are a benchmark, not a test: docs/training.md). Its live-bytes count is the
estimator's StorageTracker, checked against known allocations in tests/tools/test_estimate_memory.py."""

import json

import torch

from tests.launch import load_tool


def test_fake_and_real_tensors_count_the_same_and_chunking_keeps_less(capsys):
    bench = load_tool("bench_loss")
    shape = dict(tokens=64, vocab=300, hidden_size=16, dtype=torch.bfloat16, device="cpu")
    for fn in (bench.before, lambda h, w, y: bench.after(h, w, y, chunk_tokens=16, chunk_vocab=64)):
        real, fake = bench.measure(fn, real=True, **shape), bench.measure(fn, real=False, **shape)
        assert {k: v for k, v in real.items() if k != "loss"} == {k: v for k, v in fake.items() if k != "loss"}
        assert real["grads_bytes"] == 300 * 16 * 2 + 64 * 16 * 2 + 4  # grad_W, grad_hidden (bf16), the loss
    assert bench.main(["--tokens", "512", "--vocab", "4000", "--hidden", "32", "--chunk-vocab", "256"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["after_peak_bytes"] < result["before_peak_bytes"] and result["ratio"] == result["after_peak_bytes"] / result["before_peak_bytes"]
