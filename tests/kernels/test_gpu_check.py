"""tools/gpu_check.py on CPU: --quick runs every part in the Triton interpreter with tiny shapes.

What this proves: the script runs end to end without CUDA (imports, layouts, block tables, the
correctness check against the fp32 reference, the speed / tuning / training-step code paths),
writes its JSON and markdown, records what needs CUDA as skipped, and keeps going when a part
dies. It asserts behaviour, never timings (CPU interpreter times mean nothing).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tools.gpu_check import speed, workload

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")


def _run(tmp_path, *args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    env.update(env_extra or {})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, TOOL, "--cpu", "--quick", "--output", str(out), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(out / "gpu_check.json") as f:
        full = json.load(f)
    return out, last, full, proc


# long (make test-long): parts a-d of the GPU script in the Triton interpreter; the kernels they
# call are make test's own (tests/kernels/, tests/attention/), and the script's end-to-end path
# (its processes, JSON and markdown) stays in make test through test_a_dead_part_is_recorded.
@pytest.mark.long
def test_quick_all_parts_on_cpu(tmp_path):
    out, last, full, proc = _run(tmp_path, "--parts", "a,b,c,d")
    assert (out / "gpu_check.md").exists() and all((out / f"part_{p}.json").exists() for p in "abcd")
    assert last["json"] == str(out / "gpu_check.json") and last["gpu"] is None and last["quick"] is True
    assert {p: r["status"] for p, r in full["parts"].items()} == {p: "ok" for p in "abcd"}, {p: r.get("error") for p, r in full["parts"].items()}

    # a: a real check on CPU: every backend within the bound, triton with gradients, flex forward only
    a = full["parts"]["a"]
    assert a["summary"]["all_ok"] and a["summary"]["checks"] == len(a["checks"]) > 0
    assert {c["dtype"] for c in a["checks"]} == {"bfloat16", "float16"}
    assert {c["backend"] for c in a["checks"]} == {"triton", "sdpa", "flex"}
    for c in a["checks"]:
        keys = ("out",) if c["backend"] == "flex" else ("out", "dq", "dk", "dv")
        assert all(c[k]["ok"] and c[k]["err"] <= c[k]["bound"] for k in keys), c
    assert any(c["Hq"] != c["Hkv"] for c in a["checks"]) and any(c["suffix_sees_bos"] for c in a["checks"])

    # b: every mask measured for the triton kernel; flex forward agrees with it; SDPA flash/cuDNN are CUDA-only
    b = full["parts"]["b"]
    assert {r["mask"] for r in b["runs"]} == set(speed.MASKS)
    for r in b["runs"]:
        assert "error" not in r, r
        assert r["triton"]["fwd_bwd_ms"] > 0 and r["block_table_build_ms"] >= 0
        assert 0 < r["allowed_pairs"] <= r["causal_pairs"]
        assert r["flex"]["max_abs_diff_vs_triton"] < 0.05 and "no FlexAttention backward on CPU" in r["flex"]["note"]
        if r["mask"] == "causal":
            assert r["allowed_pairs"] == r["causal_pairs"] and "fwd_ms" in r["sdpa_math"] and "sdpa_flash" not in r
        if r["mask"].startswith("gem"):
            assert r["allowed_pairs"] < r["causal_pairs"]

    # c: a recommendation per head dim, every measured candidate checked against the default config
    c = full["parts"]["c"]
    assert len(c["recommendation"]) == len(c["head_dims"])
    assert all(rec.startswith("default_launch_config (") for rec in c["recommendation"])
    for r in c["per_head_dim"].values():
        assert "best" in r and r["candidates"]
        assert all(x["ok"] for x in r["candidates"] if "error" not in x)
    assert any(line.startswith("default_launch_config (") for line in proc.stdout.splitlines())

    # d: three attention variants of one tiny Llama step, finite losses
    d = full["parts"]["d"]
    assert set(d["variants"]) == {"causal_flash", "gem_triton", "gem_sdpa"}
    for name, v in d["variants"].items():
        assert "error" not in v, (name, v)
        assert v["tokens_per_s"] > 0 and v["loss_finite"] and v["mfu"] is None
    assert d["gem_documents"] >= 1 and d["allowed_pairs"] < d["causal_pairs"]  # the quick batch (seed 7) holds a GEM document

    # targets are GPU-only: not evaluated here, and said so
    assert all(t["status"].startswith("not evaluated") for t in full["targets"].values())
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Targets", "## a. Correctness", "## b. Speed", "## c. Tuning", "## d. Training step"):
        assert heading in md


def test_a_dead_part_is_recorded(tmp_path):
    """A part whose process dies outright is recorded as failed; the run still writes its files."""
    out, last, full, _ = _run(tmp_path, "--parts", "c", env_extra={"GPU_CHECK_CRASH_PART": "c"})
    assert full["parts"]["c"]["status"] == "failed" and full["parts"]["c"]["process_exit"] == 3
    assert last["parts"]["c"]["status"] == "failed" and (out / "gpu_check.md").exists()


def test_imports_no_training_frameworks():
    """The GPU machine has no deepspeed or megatron-core: what the script imports must not pull them."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import gpu_check.main; "
        "import megatron_gem.gem.layout, megatron_gem.gem.losses, megatron_gem.attention.hf, megatron_gem.data.packing, "
        "megatron_gem.kernels.gem_attention_triton, megatron_gem.kernels.reference; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'megatron', 'mteb', 'lm_eval', 'datasets')))"
    )
    env = dict(os.environ, PYTHONPATH=REPO, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_embedded_length_table_is_the_corpus_measurement():
    got = workload.corpus_length_table()
    if got is None:
        pytest.skip("python3.11-doc is not installed here")
    assert got[0].tolist() == list(workload.EMBEDDED_LENGTHS)


def test_packings():
    table = np.array(workload.EMBEDDED_LENGTHS)
    for L in (8192, 16384, 32768):
        lo, hi = workload.flashmask_doc_range(L)
        doc, role, info = workload.make_mask("doc_flashmask", L, table, seed=1)
        assert lo <= info["documents"] <= hi and doc.shape == (1, L) and int(role.max()) == 0
    doc, role, info = workload.make_mask("gem_corpus", 4096, table, seed=1)
    assert info["gem_documents"] > 0 and set(role.unique().tolist()) == {0, 1, 2}
    # documents are contiguous runs with distinct labels
    starts = int((doc[0, 1:] != doc[0, :-1]).sum()) + 1
    assert starts == len(doc.unique()) == info["documents"]
