"""DeepSpeed JSON configs: load, fill the "auto" fields from the arguments, sanity-check."""

from __future__ import annotations

import json

AUTO = "auto"


def _hidden_size(model_config) -> int:
    return int(getattr(model_config, "hidden_size", 0) or 0)


def load_ds_config(path: str | None, job, model_config=None) -> dict:
    """Read ``path`` (or a minimal ZeRO-0 config when None) and fill "auto" fields.

    ``job``: the JobConfig (batch sizes, data-parallel size, optimizer settings, bf16). Filled:
    train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
    gradient_clipping, bf16.enabled, optimizer.params lr / betas / weight_decay, and the
    ZeRO-3 bucket sizes derived from the model's hidden size (as transformers' integration
    does). Explicit numbers in the file must agree with the arguments.
    """
    if path is None:
        cfg: dict = {"zero_optimization": {"stage": 0}}
    else:
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    where = path or "<default DeepSpeed config>"
    b, o = job.batch, job.optimizer
    gas = b.accumulation_steps

    def fill(section: dict, key: str, value, flag: str) -> None:
        current = section.get(key, AUTO)
        if current == AUTO:
            section[key] = value
        elif current != value:
            raise ValueError(f'{where}: {key}={current!r} conflicts with {flag} (which gives {value!r}); set it to "auto"')

    fill(cfg, "train_micro_batch_size_per_gpu", b.micro_batch_size, "--micro-batch-size")
    fill(cfg, "gradient_accumulation_steps", gas, "--global-batch-size / (--micro-batch-size x dp)")
    fill(cfg, "train_batch_size", b.global_batch_size, "--global-batch-size")
    fill(cfg, "gradient_clipping", o.clip_grad, "--clip-grad")
    bf16 = cfg.setdefault("bf16", {})
    fill(bf16, "enabled", bool(job.model.bf16), "--bf16")
    if cfg.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{where}: fp16 is not supported for GEM training; use bf16 (--bf16) or fp32")
    if cfg.get("fp16", {}).get("enabled") == AUTO:
        cfg["fp16"]["enabled"] = False
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        fill(params, "lr", o.lr, "--lr")
        fill(params, "betas", [o.adam_beta1, o.adam_beta2], "--adam-beta1/--adam-beta2")
        fill(params, "weight_decay", o.weight_decay, "--weight-decay")
    if "scheduler" in cfg:
        raise ValueError(f"{where}: remove the 'scheduler' section: train.py runs the two-phase GEM schedule itself")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    hidden = _hidden_size(model_config) if model_config is not None else 0
    for key, value in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == AUTO:
            if not hidden:
                raise ValueError(f'{where}: zero_optimization.{key} is "auto" but the model\'s hidden size is unknown')
            zero[key] = value
    leftover = _find_auto(cfg)
    if leftover:
        raise ValueError(f'{where}: no argument fills "auto" at {leftover}; give a number there')
    return cfg


def _find_auto(node, prefix="") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{prefix}.{k}" if prefix else k)
            if hit:
                return hit
    elif node == AUTO:
        return prefix
    return None


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
