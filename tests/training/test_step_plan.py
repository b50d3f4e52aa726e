"""The one step schedule (training/step_plan.py): which passes a plan runs, in which order, over
which units, and what one record per micro-batch holds. The engines' equality tests
(test_megatron_engine.py, test_deepspeed_engine.py, test_grad_cache.py) tie the passes to the
numbers; these tie the composition to the plan."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from megatron_gem.training.step_plan import StepPlan, run_step, step_output


def _job(summary: bool, fast: bool = True):
    return SimpleNamespace(gem=SimpleNamespace(summary_mode=summary), model=SimpleNamespace(summary_fast_path=fast))


def _texts(n: int, rows: int = 2, length: int = 6, pad: int = 1) -> dict:
    doc_ids = torch.arange(rows)[:, None].expand(rows, length).clone()
    doc_ids[:, length - pad :] = -1
    return {"doc_ids": doc_ids, "num_texts": n, "num_negatives": 0}


@pytest.mark.parametrize(
    "summary, fast, prefill_pass, chunks, expected",
    [
        (False, True, True, False, StepPlan()),
        (True, False, True, False, StepPlan()),
        (True, True, False, True, StepPlan(summary_positions=True, grad_cache=True)),
        (True, True, True, True, StepPlan(summary_positions=True, prefill=True, ntp_apart=True, grad_cache=True)),
    ],
)
def test_plan_of_a_step(summary, fast, prefill_pass, chunks, expected):
    cl = {**_texts(2), "chunks": [_texts(1), _texts(1)]} if chunks else _texts(2)
    assert StepPlan.of(_job(summary, fast), [cl], prefill_pass=prefill_pass) == expected
    assert StepPlan.of(_job(summary, fast), [], prefill_pass=prefill_pass) == StepPlan()  # phase 1: no texts, nothing to plan


class RecordingPasses:
    """Passes that run nothing but say what they were asked: embeddings are a fixed function of
    a chunk's size so GradCache's gradients can be computed."""

    def __init__(self):
        self.calls = []

    def forward_backward(self, units, *, finalize=True):
        self.calls.append(("forward_backward", finalize, [(u.micro, u.chunk, u.ntp is not None, u.cl is not None, u.cached is not None) for u in units]))
        return [{"ntp_sum": 1.5 if u.ntp is not None else None, "ntp_tokens": 3 if u.ntp is not None else 0, "cl": 0.25, "tokens": 10} for u in units]

    def forward_only(self, units):
        self.calls.append(("forward_only", [(u.micro, u.chunk) for u in units]))
        out = []
        for u in units:
            u.begin_forward(pass_one=True)
            n = u.cl["num_texts"]
            out.append((torch.linspace(-1, 1, 2 * n * 4).view(2 * n, 4) + u.micro, torch.tensor(5.0)))
        return out

    @contextlib.contextmanager
    def prefill(self, units):
        self.calls.append(("prefill", [(u.micro, u.chunk) for u in units]))
        yield [dataclasses.replace(u, tokens=100, cl={**u.cl, "summary_step": True}) for u in units]


def test_summary_fast_path_with_grad_cache_runs_the_ntp_pass_then_prefill_then_both_cache_passes():
    plan = StepPlan(summary_positions=True, prefill=True, ntp_apart=True, grad_cache=True)
    ntp = [{"doc_ids": torch.zeros(1, 4, dtype=torch.long)} for _ in range(2)]
    cl = [{**_texts(2), "chunks": [_texts(1), _texts(1)]} for _ in range(2)]
    passes = RecordingPasses()
    records = run_step(plan, passes, ntp, cl, w_cl=1.0)
    chunks = [(m, c) for m in range(2) for c in range(2)]
    assert passes.calls == [
        ("forward_backward", False, [(0, 0, True, False, False), (1, 0, True, False, False)]),  # NTP apart, finalized later
        ("prefill", chunks),
        ("forward_only", chunks),
        ("forward_backward", True, [(m, c, False, True, True) for m, c in chunks]),
    ]
    assert [r["ntp_sum"] for r in records] == [1.5, 1.5]
    assert all(r["ntp_tokens"] == 3 for r in records)
    # a summary step stands for its chunk's rows (the prefill said 100), plus the NTP pass's rows
    assert [r["tokens"] for r in records] == [100 + 100 + 10, 100 + 100 + 10]
    # the contrastive term is the cached one of the micro-batch's chunks, not a per-chunk figure
    assert all(r["cl"] is not None and r["cl"] != 0.25 for r in records)
    out = step_output(records, lr=0.1, grad_norm=torch.tensor(2.0), reporter=True, logit_scale=None)
    assert out.ntp_sums == [1.5, 1.5] and out.tokens == 420 and out.grad_norm == 2.0 and out.local_losses == out.ntp_sums + out.cl_values


def test_plain_step_is_one_pass_with_ntp_and_texts_in_each_unit():
    passes = RecordingPasses()
    records = run_step(StepPlan(), passes, [{"x": 0}] * 3, [_texts(2)] * 3, w_cl=1.0)
    assert passes.calls == [("forward_backward", True, [(m, 0, True, True, False) for m in range(3)])]
    assert records == [{"ntp_sum": 1.5, "ntp_tokens": 3, "cl": 0.25, "tokens": 10}] * 3


def test_grad_cache_keeps_ntp_rows_on_the_first_chunk_and_unequal_chunk_counts_are_refused():
    passes = RecordingPasses()
    cl = [{**_texts(3), "chunks": [_texts(1), _texts(1), _texts(1)]}]
    records = run_step(StepPlan(grad_cache=True), passes, [{"x": 0}], cl, w_cl=1.0)
    assert passes.calls[-1] == ("forward_backward", True, [(0, 0, True, True, True), (0, 1, False, True, True), (0, 2, False, True, True)])
    assert records[0]["tokens"] == 30 and records[0]["ntp_sum"] == 1.5
    uneven = [{**_texts(2), "chunks": [_texts(1), _texts(1)]}, {**_texts(2), "chunks": [_texts(2)]}]
    with pytest.raises(RuntimeError, match="same number of GradCache chunks"):
        run_step(StepPlan(grad_cache=True), RecordingPasses(), [], uneven, w_cl=1.0)
