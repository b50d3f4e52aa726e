"""One optimizer step composed from parts: the one step schedule both engines run.

A step's micro-batches are shaped by independent parts, each decided once here:

* **gradient positions**: all rows, or only the summary tokens (summary mode's fast path,
  gem/summary_step.py: the forward that carries autograd is the summary step);
* **prefill**: the text runs first without autograd, its keys and values kept for the
  summary step (the fast path's cached prefill). An engine either runs it as a pass of its own
  (``Passes.prefill``: megatron-core, whose pipeline messages need the summary step as a micro-
  batch) or inside the model's forward (the HF model's ``summary_states``: DeepSpeed);
* **NTP apart**: with the prefill as a pass, a phase-2 step's NTP rows (GEM layouts, whose
  suffix depends on the deltas) cannot ride in the summary step; they get a forward-backward
  pass of their own, its gradients finalized with the step's last pass;
* **GradCache** (``--contrastive-micro-batch-size``, training/grad_cache.py): the micro-batch's
  chunks are embedded without a graph (``Passes.forward_only``), the contrastive term's
  gradient per chunk embedding is computed once (``embedding_grads``), and each chunk runs
  again with a graph and the surrogate loss, one backward per chunk; a micro-batch's NTP rows
  ride with its first chunk.

``run_step`` composes them into passes over ``Unit``s (one per micro-batch, or per chunk) and
folds what the passes report back into one record per micro-batch. An engine supplies only
how its parallelism runs a pass (``Passes``): megatron-core through forward_backward_func
(pipeline schedules included), DeepSpeed through ``engine.backward``/``engine.step`` with its
accumulation boundaries. A new combination of parts is a new ``StepPlan``, not a new path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..gem.losses import Distillation, GatherKeys
from .grad_cache import CachedGradients, RngSnapshot, chunk_teacher_rows, embedding_grads, surrogate_loss
from .step import StepOutput


@dataclass(frozen=True)
class StepPlan:
    summary_positions: bool = False  # gradients only at the summary tokens (the fast path)
    prefill: bool = False  # the engine runs the no-grad prefill as a pass of its own
    ntp_apart: bool = False  # NTP rows in a forward-backward pass of their own
    grad_cache: bool = False  # contrastive micro-batches come in chunks (GradCache)

    @classmethod
    def of(cls, job, cl_batches: list, *, prefill_pass: bool) -> StepPlan:
        """The plan of a step with these contrastive micro-batches. ``prefill_pass``: the engine
        runs the fast path's prefill as a pass (else its model's forward does)."""
        fast = bool(cl_batches) and job.gem.summary_mode and job.model.summary_fast_path
        return cls(
            summary_positions=fast,
            prefill=fast and prefill_pass,
            ntp_apart=fast and prefill_pass,
            grad_cache=bool(cl_batches) and "chunks" in cl_batches[0],
        )


@dataclass
class Unit:
    """One forward of a pass: micro-batch ``micro``'s NTP rows (``ntp``) and/or contrastive rows
    (``cl``: the micro-batch, one of its ``chunks`` GradCache chunks, or their summary step).
    GradCache pass 2 units carry their ``cached`` gradients; ``rng`` is the random state their
    pass-1 forward ran under."""

    micro: int
    chunk: int = 0
    chunks: int = 1
    ntp: dict | None = None
    cl: dict | None = None
    cached: CachedGradients | None = None
    rng: RngSnapshot | None = None
    tokens: int | None = None  # non-padding tokens it stands for, when not those it runs (a summary step's)
    extra: dict = field(default_factory=dict)  # engine-side per-unit data (a pass's sequence length, ...)

    @property
    def last(self) -> bool:
        """The micro-batch's last forward of the pass."""
        return self.chunk == self.chunks - 1

    def begin_forward(self, *, pass_one: bool = False) -> None:
        """Call right before the unit's forward: GradCache pass 1 (``pass_one``) records the random
        state, pass 2 restores it, so both passes compute the same forward (grad_cache.RngSnapshot)."""
        if pass_one:
            self.rng = RngSnapshot()
        elif self.cached is not None and self.rng is not None:
            self.rng.restore()

    def surrogate(self, emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """GradCache pass 2's loss of this chunk (the logit scale's gradient rides with chunk 0)."""
        return surrogate_loss(emb, self.cached.grads[self.chunk], scale, self.cached.scale_grad if self.chunk == 0 else None)


class Passes(Protocol):
    """How an engine's parallelism runs the passes of a step. Each pass takes the units in order;
    the engine calls ``unit.begin_forward()`` right before each unit's forward. Records are dicts
    with ``ntp_sum`` (None: no NTP rows), ``ntp_tokens``, ``cl`` (None: no contrastive term) and
    ``tokens`` (the non-padding tokens the forward ran)."""

    def forward_backward(self, units: list[Unit], *, finalize: bool = True) -> list[dict]:
        """Forward and backward every unit: its loss is the micro-batch loss of its rows, or,
        with ``unit.cached``, its NTP part plus ``unit.surrogate``. ``finalize=False``: leave the
        gradients for a later pass of the same step to finalize (reduce) once."""

    def forward_only(self, units: list[Unit]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Without a graph: (embeddings, logit scale) of every unit's contrastive rows."""

    def prefill(self, units: list[Unit]) -> contextlib.AbstractContextManager[list[Unit]]:
        """The no-grad prefill of every unit's contrastive rows; yields the summary-step units
        that read it (the record lives until the block ends)."""


def run_step(plan: StepPlan, passes: Passes, ntp_batches: list, cl_batches: list, *, w_cl: float, gather_keys=None, distill=None) -> list[dict]:
    """Every pass of one optimizer step; one record per micro-batch: ``ntp_sum``, ``ntp_tokens``,
    ``cl`` (the contrastive term, None without one) and ``tokens`` (every non-padding token of
    the micro-batch's rows)."""
    accum = max(len(ntp_batches), len(cl_batches))
    apart: list[tuple[Unit, dict]] = []
    if plan.ntp_apart and ntp_batches:
        if len(ntp_batches) != accum or len(cl_batches) != accum:
            raise RuntimeError(f"a phase-2 step has {len(ntp_batches)} NTP and {len(cl_batches)} contrastive micro-batches; the fast path pairs them")
        ntp_units = [Unit(m, ntp=b) for m, b in enumerate(ntp_batches)]
        apart = list(zip(ntp_units, passes.forward_backward(ntp_units, finalize=False)))  # each pass divides by its own unit count: the same accum
        ntp_batches = []
    units = _units(ntp_batches, cl_batches, accum, chunked=plan.grad_cache)
    with passes.prefill(units) if plan.prefill else contextlib.nullcontext(units) as units:
        if plan.grad_cache:
            _cache_gradients(units, passes.forward_only(units), w_cl=w_cl, gather_keys=gather_keys, distill=distill)
        records = passes.forward_backward(units)
    return _fold(list(zip(units, records)), apart)


def _units(ntp_batches: list, cl_batches: list, accum: int, *, chunked: bool) -> list[Unit]:
    """One unit per micro-batch, or per GradCache chunk (the NTP rows with the first chunk)."""
    units = []
    for m in range(accum):
        ntp = ntp_batches[m] if ntp_batches else None
        cl = cl_batches[m] if cl_batches else None
        if not chunked:
            units.append(Unit(m, ntp=ntp, cl=cl))
            continue
        chunks = cl["chunks"]
        if len(chunks) != len(cl_batches[0]["chunks"]):
            raise RuntimeError("every contrastive micro-batch of a step must have the same number of GradCache chunks")
        for c, chunk in enumerate(chunks):
            units.append(Unit(m, c, len(chunks), ntp=ntp if c == 0 else None, cl=chunk))
    return units


def _cache_gradients(units: list[Unit], embedded: list, *, w_cl: float, gather_keys, distill) -> None:
    """GradCache between the passes: per micro-batch, the contrastive term of its chunks'
    embeddings and its gradient per chunk (grad_cache.embedding_grads), handed to pass 2's units."""
    by_micro: dict[int, list[int]] = {}
    for k, u in enumerate(units):
        by_micro.setdefault(u.micro, []).append(k)
    for ks in by_micro.values():
        chunks = [units[k].cl for k in ks]
        counts = [(int(ch["num_texts"]), int(ch.get("num_negatives", 0))) for ch in chunks]
        cached = embedding_grads(
            [embedded[k][0] for k in ks],
            counts,
            embedded[ks[0]][1],
            weight=w_cl,
            gather_keys=gather_keys,
            teacher=chunk_teacher_rows(chunks),
            distill=distill,
        )
        for k in ks:
            units[k].cached = cached
    embedded.clear()


def _fold(ran: list[tuple[Unit, dict]], apart: list[tuple[Unit, dict]]) -> list[dict]:
    """One record per micro-batch from the passes' per-unit records: the NTP figures of the unit
    that carried its NTP rows (the first, or the NTP pass of its own), the contrastive term (the
    micro-batch's cached one under GradCache), every token its units stand for."""
    out: dict[int, dict] = {}
    for u, r in ran:
        if u.micro not in out:
            cl = u.cached.loss if u.cached is not None else r.get("cl")
            out[u.micro] = {"ntp_sum": r.get("ntp_sum"), "ntp_tokens": r.get("ntp_tokens", 0), "cl": cl, "tokens": 0}
        out[u.micro]["tokens"] += u.tokens if u.tokens is not None else r["tokens"]
    for u, r in apart:
        rec = out[u.micro]
        rec.update(ntp_sum=r["ntp_sum"], ntp_tokens=r["ntp_tokens"])
        rec["tokens"] += r["tokens"]
    return [out[m] for m in sorted(out)]


def step_output(records: list[dict], *, lr: float, grad_norm, reporter: bool, logit_scale: float | None) -> StepOutput:
    """The StepOutput of a step's per-micro-batch records (run_step)."""
    ntp_sums = [r["ntp_sum"] for r in records if r["ntp_sum"] is not None]
    cl_values = [r["cl"] for r in records if r["cl"] is not None]
    return StepOutput(
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        reporter=reporter,
        ntp_sums=ntp_sums,
        cl_values=cl_values,
        tokens=sum(r["tokens"] for r in records),
        logit_scale=logit_scale,
        local_losses=ntp_sums + cl_values,
    )


def cached_backward(
    forward, backward, batch: dict, *, weight: float, gather_keys: GatherKeys | None = None, extra=None, distill: Distillation | None = None
) -> float:
    """Both GradCache passes over ``batch["chunks"]`` for a caller that runs its own forward and
    backward calls (a plain-PyTorch loop, tools/bench_train.py). ``forward(chunk)`` ->
    (embeddings, logit scale); ``backward(loss, last)`` backpropagates one chunk's surrogate
    (``last``: the micro-batch's final backward); ``extra()`` (optional) gives a loss that rides
    with the first chunk's backward (phase 2's NTP part when alpha < 1). Chunks that carry the
    teacher's rows (``chunk["teacher"]``, distill/teacher_rows.py) add the teacher's term (``distill``).
    Returns the micro-batch's contrastive term. The passes are training/step_plan.py's, the
    engines' own."""
    passes = _CallablePasses(forward, backward, extra)
    records = run_step(StepPlan(grad_cache=True), passes, [], [batch], w_cl=weight, gather_keys=gather_keys, distill=distill)
    return records[0]["cl"]


class _CallablePasses:
    """step_plan.Passes over two callables (see cached_backward)."""

    def __init__(self, forward, backward, extra):
        self.forward, self.backward, self.extra = forward, backward, extra

    def forward_only(self, units) -> list:
        out = []
        with torch.no_grad():
            for u in units:
                u.begin_forward(pass_one=True)
                out.append(self.forward(u.cl))
        return out

    def forward_backward(self, units, *, finalize: bool = True) -> list[dict]:
        for u in units:
            u.begin_forward()
            emb, scale = self.forward(u.cl)
            loss = u.surrogate(emb, scale)
            if u.chunk == 0 and self.extra is not None:
                loss = loss + self.extra()
            self.backward(loss, u.last)
        return [{"ntp_sum": None, "ntp_tokens": 0, "cl": None, "tokens": 0} for _ in units]

    def prefill(self, units):
        raise NotImplementedError("no prefill pass here")
