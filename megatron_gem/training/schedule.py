"""Learning-rate schedule of the two GEM phases: warmup + cosine within each phase."""

from __future__ import annotations

import math

import torch


def phase_lr(step: int, start: int, end: int, peak: float, warmup_fraction: float, min_ratio: float) -> float:
    """LR at ``step`` of a phase spanning [start, end): linear warmup then cosine to min_ratio*peak."""
    length = max(end - start, 1)
    t = step - start
    warmup = int(warmup_fraction * length)
    if t < warmup:
        return peak * (t + 1) / warmup
    progress = (t - warmup) / max(length - warmup, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def gem_lr(
    step: int, *, train_iters: int, contrastive_from_step: int, lr: float, contrastive_lr: float, warmup_fraction: float = 0.01, min_ratio: float = 0.0
) -> float:
    """Phase 1 (mixed NTP, peak ``lr``) on [0, contrastive_from_step), phase 2 (contrastive,
    peak ``contrastive_lr``) on [contrastive_from_step, train_iters)."""
    if step < contrastive_from_step:
        return phase_lr(step, 0, contrastive_from_step, lr, warmup_fraction, min_ratio)
    return phase_lr(step, contrastive_from_step, train_iters, contrastive_lr, warmup_fraction, min_ratio)


def lr_for_step(step: int, job) -> float:
    """The LR of ``step`` for a JobConfig."""
    o = job.optimizer
    return gem_lr(
        step,
        train_iters=o.train_iters,
        contrastive_from_step=job.gem.contrastive_from_step,
        lr=o.lr,
        contrastive_lr=o.contrastive_lr,
        warmup_fraction=o.lr_warmup_fraction,
        min_ratio=o.min_lr_ratio,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, job) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over the optimizer's base lr (= job.optimizer.lr); its state is only the step
    count, so it resumes exactly from a checkpoint."""

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_for_step(step, job) / job.optimizer.lr)
