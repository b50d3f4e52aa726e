"""The memory estimator (training/memory_estimate.py) against the real peak of a small Llama
trained with the real DeepSpeed engine on CPU (tests/training/memory_worker.py: one process,
fp32, the allocator's own records), for every ZeRO stage, with and without activation
recomputation, and in summary mode (frozen base, deltas at the summary tokens). The estimate must be within 10% of the measured peak; and the activations
must be a large enough share of that peak that an estimate without them would miss it (so
the tolerance tests the activation measurement, not only the state arithmetic)."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import REPO, free_port, subprocess_env

sys.path.insert(0, os.path.dirname(__file__))
import memory_worker as W  # noqa: E402

TOLERANCE = 0.10
# (ZeRO stage, micro-batch, length, recompute, summary mode)
CASES = [(0, 2, 512, False, False), (1, 2, 512, True, False), (2, 2, 512, False, False), (3, 4, 512, True, False), (1, 2, 512, False, True)]


def measured_peak(stage, mb, seq, checkpointing, summary, extra=()) -> dict:
    args = ["tests/training/memory_worker.py", str(stage), str(mb), str(seq)]
    args += (["--gradient-checkpointing"] if checkpointing else []) + (["--summary"] if summary else []) + list(extra)
    env = subprocess_env(MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # a training run, as tests.launch starts train.py (the interpreter changes what DeepSpeed allocates)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# make test keeps ZeRO-0 (the activations carry the peak), ZeRO-3 with recompute (partitioned
# state, recomputed activations) and summary mode; ZeRO-1 and ZeRO-2 are further cases of the
# same sharding arithmetic: make test-long (docs/testing.md).
LONG = {(1, 2, 512, True, False), (2, 2, 512, False, False)}


@pytest.mark.parametrize(
    "stage,mb,seq,checkpointing,summary",
    [pytest.param(*c, marks=[pytest.mark.long] if c in LONG else []) for c in CASES],
    ids=[f"zero{c[0]}-mb{c[1]}{'-recompute' if c[3] else ''}{'-summary' if c[4] else ''}" for c in CASES],
)
def test_estimate_matches_real_deepspeed_peak(stage, mb, seq, checkpointing, summary):
    from megatron_gem.training.memory_estimate import Layout, estimate_step_memory

    real = measured_peak(stage, mb, seq, checkpointing, summary)["peak"]
    est = estimate_step_memory(
        W.config(),
        Layout(zero_stage=stage, dp=1, reduce_bucket_size=W.HIDDEN**2),
        micro_batch_size=mb,
        seq_length=seq,
        vocab_size=W.VOCAB,
        bf16=False,
        gradient_checkpointing=checkpointing,
        backend="sdpa",  # what the CPU run takes for packed rows
        optimizer="torch_adamw",
        train_mode="summary" if summary else "full",
    )
    err = est.peak / real - 1
    print(
        f"ZeRO-{stage} mb={mb} seq={seq} recompute={checkpointing} summary={summary}: estimated {est.peak / 1e6:.1f} MB, measured {real / 1e6:.1f} MB ({err:+.1%})"
    )
    assert abs(err) <= TOLERANCE, (est.gb(), real)
    if not checkpointing:  # the measurement carries weight: without it the estimate would be off by more than the tolerance
        states_only = est.parameters + est.gradients + est.optimizer
        assert real - states_only > TOLERANCE * real


# Phase 2 (contrastive): (ZeRO stage, pairs, max length, GradCache chunk, alpha, summary mode), on
# rows of 512 tokens (2 NTP rows ride with the texts when alpha < 1). make test keeps ZeRO-0
# with and without GradCache; the other stages, alpha < 1 and summary mode's fast path are
# make test-long.
PHASE2 = [
    (0, 8, 128, None, 1.0, False),
    (0, 8, 128, 2, 1.0, False),
    (2, 32, 128, 8, 1.0, False),
    (1, 8, 128, None, 0.5, False),
    (3, 8, 128, 4, 1.0, False),
    (1, 16, 128, 4, 1.0, True),
]
PHASE2_LONG = {PHASE2[2], PHASE2[3], PHASE2[4], PHASE2[5]}


@pytest.mark.parametrize(
    "stage,pairs,max_length,chunk,alpha,summary",
    [pytest.param(*c, marks=[pytest.mark.long] if c in PHASE2_LONG else []) for c in PHASE2],
    ids=[f"zero{c[0]}-{c[1]}x{c[2]}{f'-gradcache{c[3]}' if c[3] else ''}{f'-alpha{c[4]:g}' if c[4] < 1 else ''}{'-summary' if c[5] else ''}" for c in PHASE2],
)
def test_phase2_estimate_matches_real_deepspeed_peak(stage, pairs, max_length, chunk, alpha, summary):
    from megatron_gem.training.contrastive_memory import ContrastiveShape, estimate_contrastive_memory
    from megatron_gem.training.memory_estimate import Layout

    mb, seq = 2, 512
    extra = ["--phase2", str(pairs), str(max_length), "--alpha", str(alpha)] + (["--chunk", str(chunk)] if chunk else [])
    real = measured_peak(stage, mb, seq, False, summary, extra)["peak"]
    est = estimate_contrastive_memory(
        W.config(),
        Layout(zero_stage=stage, dp=1, reduce_bucket_size=W.HIDDEN**2),
        ContrastiveShape(pairs, max_length, chunk=chunk, alpha=alpha),
        micro_batch_size=mb,
        seq_length=seq,
        vocab_size=W.VOCAB,
        bf16=False,
        backend="sdpa",
        optimizer="torch_adamw",
        train_mode="summary" if summary else "full",
    )
    err = est.peak / real - 1
    print(
        f"phase 2 ZeRO-{stage} {pairs} pairs x {max_length} chunk={chunk} alpha={alpha} summary={summary}: estimated {est.peak / 1e6:.1f} MB, measured {real / 1e6:.1f} MB ({err:+.1%})"
    )
    assert abs(err) <= TOLERANCE, (est.gb(), real)
    if not summary:  # the contrastive measurement carries weight (summary mode's fast path keeps few activations)
        states_only = est.parameters + est.gradients + est.optimizer
        assert real - states_only > TOLERANCE * real
