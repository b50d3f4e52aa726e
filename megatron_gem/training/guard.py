"""--check-for-nan-in-loss-and-grad (Megatron's flag; on by default): a non-finite loss or
gradient norm on any rank stops the run on every rank, before anything is saved.

The step record's loss and grad norm are already reduced over all ranks (a NaN anywhere makes
them NaN everywhere), so every rank takes the same decision without an extra collective; only
when a step is bad does one more collective find which ranks' own losses were non-finite, for
the message. Nothing is saved after the bad step: ``latest`` keeps naming the last good
checkpoint (the update of the bad step may already be in the weights, which is why they must
never be written).
"""

from __future__ import annotations

import math
import os

import torch

from ..common import distributed as D
from .checkpoint import LATEST


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient norm was NaN/Inf; the message names step, phase and ranks."""


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


def check_step(record: dict, local_losses, *, save_dir: str) -> None:
    """Raise NonFiniteError on every rank when ``record`` (reduced over ranks) holds a
    non-finite loss or grad norm. Call on every rank after every step."""
    if _finite(record["loss"]) and _finite(record.get("grad_norm")):
        return
    mine = any(v is not None and not math.isfinite(v) for v in local_losses)
    flags = torch.zeros(D.world_size(), dtype=torch.float64)
    flags[D.rank()] = 1.0 if mine else 0.0
    ranks = [r for r, f in enumerate(D.all_reduce_sum(flags).tolist()) if f > 0]
    what = f"non-finite loss on rank(s) {', '.join(map(str, ranks))}" if ranks else "finite losses on every rank"
    latest = os.path.join(save_dir, LATEST)
    kept = open(latest).read().strip() if os.path.isfile(latest) else None
    raise NonFiniteError(
        f"step {record['step']} (phase {record['phase']}): {what}, loss {record['loss']}, grad norm {record.get('grad_norm')}; "
        f"stopped on every rank before saving: {latest} still names {kept or 'no checkpoint (none was saved yet)'} "
        f"(--no-check-for-nan-in-loss-and-grad turns this check off)"
    )
