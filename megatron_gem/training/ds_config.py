"""DeepSpeed JSON configs: read and type-check (``read_ds_json``), fill the "auto" fields from
the arguments and check the numbers against them (``load_ds_config``). train.py runs both while
checking its flags, before any model is loaded; the engine runs them again with the model's
config (the ZeRO-3 bucket sizes). Errors name the file and the line of the key."""

from __future__ import annotations

import json
import numbers

AUTO = "auto"
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _line_of(text: str, key: str) -> int:
    """The line of the first ``"key"`` in the file (1 when absent): where to look."""
    at = text.find(f'"{key}"')
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def read_ds_json(path: str) -> dict:
    """The DeepSpeed config at ``path``, type-checked: a JSON object; batch sizes positive
    integers or "auto"; gradient_clipping a number >= 0 or "auto"; bf16/fp16/zero_optimization/
    optimizer objects; bf16/fp16 "enabled" true/false/"auto"; ZeRO stage 0-3. ValueError
    ``PATH:LINE: what is wrong``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (a JSON file expected)") from e
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}:{_line_of(text, key.rsplit('.', 1)[-1])}: {key} {why}")

    if not isinstance(cfg, dict):
        raise ValueError(f"{path}:1: a DeepSpeed config is a JSON object, this file holds a JSON {type(cfg).__name__}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in BATCH_KEYS:
        v = cfg.get(key, AUTO)
        if v != AUTO and not (is_int(v) and v >= 1):
            raise bad(key, f'is {v!r}; a positive integer or "auto" expected')
    v = cfg.get("gradient_clipping", AUTO)
    if v != AUTO and not (isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0):
        raise bad("gradient_clipping", f'is {v!r}; a number >= 0 or "auto" expected')
    for section in ("bf16", "fp16", "zero_optimization", "optimizer"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise bad(section, f"is a JSON {type(cfg[section]).__name__}; an object expected")
    for section in ("bf16", "fp16"):
        v = cfg.get(section, {}).get("enabled", AUTO)
        if v != AUTO and not isinstance(v, bool):
            raise bad(f"{section}.enabled", f'is {v!r}; true, false or "auto" expected')
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if not is_int(stage) or not 0 <= stage <= 3:
        raise bad("zero_optimization.stage", f"is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and not isinstance(zero[key], dict):
            raise bad(f"zero_optimization.{key}", f"is a JSON {type(zero[key]).__name__}; an object expected")
    opt = cfg.get("optimizer")
    if opt is not None and ("params" in opt and not isinstance(opt["params"], dict)):
        raise bad("optimizer.params", "must be an object")
    return cfg


def _hidden_size(model_config) -> int:
    return int(getattr(model_config, "hidden_size", 0) or 0)


def load_ds_config(path: str | None, job, model_config=None) -> dict:
    """Read ``path`` (read_ds_json; a minimal ZeRO-0 config when None) and fill "auto" fields.

    ``job``: the JobConfig (batch sizes, data-parallel size, optimizer settings, bf16). Filled:
    train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
    gradient_clipping, bf16.enabled, optimizer.params lr / betas / weight_decay, and the
    ZeRO-3 bucket sizes derived from the model's hidden size (as transformers' integration
    does). Explicit numbers in the file must agree with the arguments: train_batch_size =
    train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel size, as the
    flags give them. ``model_config`` None (train.py's early check): the bucket sizes stay "auto".
    """
    cfg: dict = {"zero_optimization": {"stage": 0}} if path is None else read_ds_json(path)
    where = path or "<default DeepSpeed config>"
    b, o = job.batch, job.optimizer
    gas = b.accumulation_steps

    def fill(section: dict, key: str, value, flag: str) -> None:
        current = section.get(key, AUTO)
        if current == AUTO:
            section[key] = value
        elif current != value:
            raise ValueError(f'{where}: {key}={current!r} conflicts with {flag} (which gives {value!r}); set it to "auto"')

    given = [cfg.get(k, AUTO) for k in BATCH_KEYS]
    if AUTO not in given and given[2] != given[0] * given[1] * b.data_parallel_size:
        raise ValueError(
            f"{where}: train_batch_size {given[2]} is not train_micro_batch_size_per_gpu {given[0]} x gradient_accumulation_steps {given[1]} "
            f'x data-parallel size {b.data_parallel_size} = {given[0] * given[1] * b.data_parallel_size} (DeepSpeed\'s rule); set them to "auto"'
        )
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
    if model_config is None:  # not known yet: checked again when the engine builds
        return cfg if _find_auto(cfg, skip=_BUCKET_KEYS) is None else _leftover(cfg, where)
    hidden = _hidden_size(model_config)
    for key, value in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == AUTO:
            if not hidden:
                raise ValueError(f'{where}: zero_optimization.{key} is "auto" but the model\'s hidden size is unknown')
            zero[key] = value
    return cfg if _find_auto(cfg) is None else _leftover(cfg, where)


def _leftover(cfg: dict, where: str, skip=_BUCKET_KEYS):
    raise ValueError(f'{where}: no argument fills "auto" at {_find_auto(cfg, skip=skip) or _find_auto(cfg)}; give a number there')


def _find_auto(node, prefix="", skip=()) -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in skip:
                continue
            hit = _find_auto(v, f"{prefix}.{k}" if prefix else k, skip)
            if hit:
                return hit
    elif node == AUTO:
        return prefix
    return None


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
