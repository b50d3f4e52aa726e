"""Property-based tests of train.py's flag checks against an independent oracle: the range each
GEM flag documents, and DeepSpeed's rules for its JSON. A command line is refused exactly when
some value is out of range, in one line naming one of the offending flags (never a GEMConfig
field); an accepted one reaches the JobConfig unchanged."""

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_gem.training.args import ArgumentError, job_config, parse_args
from megatron_gem.training.ds_config import read_ds_json


def finite_in(lo, hi, *, lo_open=False, hi_open=False):
    def ok(v):
        return math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return ok


# flag -> ((values in range, values out of it), the documented valid range, the GEMConfig field
# it fills). A command line takes at most two flags from their out-of-range values and the rest
# from the valid ones, so lines with exactly one bad value (the telling case) come up often.
ODD = st.sampled_from([math.nan, math.inf, -math.inf])


def mostly(valid, anything):
    return (valid, anything)


def floats_in(lo, hi):
    return st.floats(min_value=lo, max_value=hi, exclude_max=False)


FLAGS = {
    "--gem-num-special-tokens": (mostly(st.integers(1, 6), st.integers(-2, 0)), lambda v: v >= 1, "num_special_tokens"),
    "--gem-min-prefix-len": (mostly(st.integers(1, 6), st.integers(-2, 0)), lambda v: v >= 1, "min_prefix_len"),
    "--gem-min-suffix-len": (mostly(st.integers(1, 6), st.integers(-2, 0)), lambda v: v >= 1, "min_suffix_len"),
    "--gem-p-raw": (mostly(floats_in(0, 1), st.one_of(floats_in(-1, 2), ODD)), finite_in(0, 1), "p_raw"),
    "--gem-prefix-dropout": (mostly(floats_in(0, 0.99), st.one_of(floats_in(-1, 2), ODD)), finite_in(0, 1, hi_open=True), "prefix_dropout"),
    "--gem-alpha": (mostly(floats_in(0, 1), st.one_of(floats_in(-1, 2), ODD)), finite_in(0, 1), "alpha"),
    "--gem-adapter-rank": (mostly(st.integers(1, 8), st.integers(-2, 0)), lambda v: v >= 1, "adapter_rank"),
    "--gem-adapter-alpha": (mostly(floats_in(0.5, 64), st.one_of(floats_in(-4, 0), ODD)), lambda v: math.isfinite(v) and v > 0, "adapter_alpha"),
    "--gem-logit-scale-init": (mostly(floats_in(1, 50), st.one_of(floats_in(0, 150), ODD)), None, "logit_scale_init"),
    "--gem-logit-scale-max": (mostly(floats_in(50, 150), st.one_of(floats_in(0, 150), ODD)), None, "logit_scale_max"),
}


def bad_flags(values: dict) -> set:
    bad = {f for f, v in values.items() if FLAGS[f][1] is not None and not FLAGS[f][1](v)}
    init, top = values["--gem-logit-scale-init"], values["--gem-logit-scale-max"]
    if not (math.isfinite(top) and top >= 1):
        bad.add("--gem-logit-scale-max")  # documented: the learnt scale's upper bound, a finite number >= 1
    if not (math.isfinite(init) and 1 <= init <= top):
        bad.add("--gem-logit-scale-init")  # in [1, --gem-logit-scale-max]
    return bad


IN_RANGE = {f: v for f, v in zip(FLAGS, (1, 4, 4, 0.8, 0.1, 1.0, 16, 32.0, 20.0, 100.0))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# The values random draws found accepted before GEMConfig checked them (kept as fixed examples).
@example(values={**IN_RANGE, "--gem-adapter-alpha": math.nan})
@example(values={**IN_RANGE, "--gem-adapter-alpha": math.inf})
@example(values={**IN_RANGE, "--gem-logit-scale-max": math.inf})
@given(
    values=st.sets(st.sampled_from(sorted(FLAGS)), max_size=2).flatmap(
        lambda wild: st.fixed_dictionaries({flag: spec[0][1] if flag in wild else spec[0][0] for flag, spec in FLAGS.items()})
    )
)
def test_gem_flags_are_refused_exactly_when_out_of_range(tiny_inputs, tmp_path_factory, values):
    save = tmp_path_factory.mktemp("flags") / "out"
    argv = ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(save), "--train-iters", "4", "--gem-contrastive-from-step", "2",
            "--seq-length", "64"]  # fmt: skip
    for flag, v in values.items():
        argv.append(f"{flag}={v}")  # "-inf" would read as an option otherwise
    bad = bad_flags(values)
    try:
        job = job_config(parse_args(argv), world_size=1)
    except ArgumentError as e:
        message = str(e)
        assert bad, f"refused a valid command line: {message}"
        assert any(message.startswith(f"{flag} ") for flag in bad), (message, bad)
        assert "GEMConfig" not in message and "\n" not in message
        return
    assert not bad, f"accepted out-of-range {sorted(bad)}"
    for flag, (_, _, field) in FLAGS.items():
        assert getattr(job.gem, field) == values[flag]


STAGES = st.one_of(st.integers(-2, 8), st.sampled_from(["3", 2.0, True, None, [3]]))
BATCH = st.one_of(st.integers(-2, 64), st.sampled_from(["auto", "8", 4.0, None, False]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=STAGES, micro=BATCH, accum=BATCH, total=BATCH)
def test_deepspeed_json_types_and_stage(tmp_path_factory, stage, micro, accum, total):
    path = tmp_path_factory.mktemp("ds") / "ds.json"
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum, "train_batch_size": total, "zero_optimization": {"stage": stage}}
    path.write_text(json.dumps(cfg, indent=2))

    def good_batch(v):
        return v == "auto" or (type(v) is int and v >= 1)

    bad = [k for k, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum), ("train_batch_size", total)) if not good_batch(v)]
    if not (type(stage) is int and 0 <= stage <= 3):
        bad.append("zero_optimization.stage")
    if not bad:
        assert read_ds_json(str(path)) == cfg
        return
    with pytest.raises(ValueError) as e:
        read_ds_json(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}:") and any(f": {k} is " in message for k in bad), (message, bad)
    line = int(message.split(":")[1])
    key = next(k for k in bad if f": {k} is " in message).rsplit(".", 1)[-1]
    assert f'"{key}"' in path.read_text().splitlines()[line - 1]  # the line named is the key's
