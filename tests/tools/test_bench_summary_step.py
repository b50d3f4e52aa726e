"""tools/bench_summary_step.py runs end to end on the tiny model and reports its figures."""

import json

from tests.launch import run_python


def test_bench_summary_step_reports_json():
    args = ["tools/bench_summary_step.py", "--model", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--steps", "1", "--warmup", "0"]
    r = json.loads(run_python(args).stdout.strip().splitlines()[-1])
    assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["summary_tokens"] > 0
    assert r["adapted_layers"] == 2 * 7 and 0 < r["loss"] < float("inf")  # every projection of both layers
    bad = run_python(["tools/bench_summary_step.py", "--steps", "0"], check=False)
    assert bad.returncode != 0 and "--steps 0" in bad.stderr
