"""megatron-core GEM training on CPU/gloo: TP=2 x PP=2 and TP=2 x DP=2 (sequence parallel,
recomputation, distributed optimizer) give the single-process numbers, validation figures
included (every run validates on --valid-data after steps 2 and 4); exact resume (also in bf16);
export. TP=2 x DP=2 and the bf16 resume are make test-long's (docs/testing.md, "Suite time"). Summary mode through megatron-core: test_megatron_summary.py."""

import json
import re

import pytest
import torch

from tests.embedder_checks import assert_embedder_ready
from tests.launch import run_torchrun
from tests.training.megatron_runs import VOLATILE, write_corpus
from tests.training.megatron_runs import close as _close
from tests.training.megatron_runs import metrics as _metrics
from tests.training.megatron_runs import train_args as _args
from tests.training.megatron_runs import valid as _valid
from tests.training.megatron_runs import weights as _weights


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mg_data"))


@pytest.fixture(scope="module")
def reference(gem_hf_checkpoint, corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("mg_ref") / "run"
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1"))
    return save


def test_single_process_run_trains_and_exports(reference, gem_hf_checkpoint):
    from megatron_gem.gem.config import GEMConfig

    m = _metrics(reference)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and [r["phase"] for r in m] == [1, 1, 2, 2]
    assert m[1]["ntp_loss"] < m[0]["ntp_loss"] and m[2]["cl_loss"] is not None and m[2]["ntp_loss"] is not None
    assert m[3]["logit_scale"] != 20.0  # the InfoNCE scale is trained in phase 2
    v = _valid(reference)
    assert [r["step"] for r in v] == [2, 4]
    for r in v:  # 1 global batch: 4 rows of held-out documents, 4 micro-batches of 4 texts
        assert r["valid_ntp_tokens_plain"] > 0 and r["valid_ntp_tokens_gem"] > 0 and r["valid_cl_texts"] == 16
        assert r["valid_ntp_loss_plain"] > 0 and r["valid_ntp_loss_gem"] > 0 and 0 <= r["valid_cl_top1"] <= 1
    assert v[1]["valid_ntp_loss"] < v[0]["valid_ntp_loss"] and v[1]["valid_cl_loss"] < v[0]["valid_cl_loss"]
    assert (reference / "latest").read_text().strip() == "global_step4"
    hf = reference / "hf"
    assert GEMConfig.load(hf).special_token_ids == GEMConfig.load(gem_hf_checkpoint).special_token_ids
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf)
    w, w0 = _weights(reference), _weights(gem_hf_checkpoint, sub=".")
    assert sorted(w) == sorted(w0) and not torch.equal(w["model.norm.weight"], w0["model.norm.weight"])
    assert_embedder_ready(hf)  # SentenceTransformer(hf) gives GEMEmbedder's vectors (K=1, builtin modules)
    assert "steps: 4 of 4 (train.py, megatron engine)" in (hf / "README.md").read_text()


def test_tp2_pp2_equals_single_process(reference, converted_checkpoint, corpus, tmp_path):
    """4 processes, TP=2 x PP=2 (1F1B schedule), started from the converted dist checkpoint."""
    save = tmp_path / "tp2pp2"
    run_torchrun(_args(converted_checkpoint, corpus, save, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"), nproc=4)
    _close(_metrics(reference), _metrics(save))
    _close(_valid(reference), _valid(save))  # forward-only 1F1B pipeline, vocab-parallel cross-entropy
    a, b = _weights(reference), _weights(save)
    assert sorted(a) == sorted(b) and len(list((save / "hf").glob("model-0000*-of-00002.safetensors"))) == 2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    # The 4-rank training checkpoint (model + distributed optimizer, megatron-core's own writer)
    # converts offline, tensor by tensor, to exactly the weights the run exported live.
    from tests.launch import run_python

    run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(save / "global_step4"), "--output", str(tmp_path / "offline")])
    c = _weights(tmp_path, sub="offline")
    assert sorted(c) == sorted(b) and all(torch.equal(c[k], b[k]) for k in b)
    assert_embedder_ready(tmp_path / "offline", manifest=False)


@pytest.mark.long  # a further 4-rank layout, with sequence parallelism and full recomputation: TP=2 x PP=2 equal to one process is make test's
def test_tp2_dp2_sequence_parallel_recompute_equals_single_process(reference, gem_hf_checkpoint, corpus, tmp_path):
    """4 processes, TP=2 x DP=2 with sequence parallelism, full recomputation and the
    distributed optimizer; phase 1 (phase 2's in-batch negatives grow with DP by design)."""
    save = tmp_path / "tp2dp2"
    extra = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "full", "--train-iters", "2"]
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, *extra), nproc=4)
    _close(_metrics(reference)[:2], _metrics(save))
    # validation's NTP figures over the two replicas (sums and counts); the contrastive ones see
    # 8 in-batch candidates instead of 4, by design
    ntp = ("valid_ntp_loss", "valid_ntp_loss_plain", "valid_ntp_loss_gem", "valid_ntp_tokens_plain", "valid_ntp_tokens_gem", "valid_cl_texts")
    _close([{k: r[k] for k in ntp} for r in _valid(reference)[:1]], _valid(save))


def test_exact_resume(reference, gem_hf_checkpoint, corpus, tmp_path):
    """Also: validation leaves training untouched. The first leg does not validate
    (--eval-iters 0); the reference validated after step 2, yet steps 3 and 4 are the same."""
    save = tmp_path / "resume"
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1", "--exit-after-iters", "2", "--eval-iters", "0"))
    assert (save / "latest").read_text().strip() == "global_step2" and not (save / "hf").exists()
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "1", "--load", str(save)))
    ref, got = _metrics(reference), _metrics(save)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for ra, rb in zip(ref, got):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    assert _valid(save) == _valid(reference)[1:]  # step 4's, on the resumed weights
    a, b = _weights(reference), _weights(save)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.long  # 2 x 2 ranks; an exact resume is make test's (test_exact_resume, test_megatron_summary), bf16 through DeepSpeed too
def test_bf16_checkpoints_resume_exactly(gem_hf_checkpoint, corpus, tmp_path):
    """--bf16 (every GPU recipe's precision) on 2 data-parallel ranks with the distributed
    optimizer: the step-2 checkpoint holds bf16 weights and fp32 optimizer state (main params,
    Adam moments), and a run resumed from it gives the uninterrupted run's steps 3-4, validation
    and export bit for bit (the same bf16 ops on the same inputs: CPU kernels are deterministic).
    Crashed at the first save before: the fp32 logit scale among bf16 parameters broke
    megatron-core's optimizer checkpoint (both the distributed and the plain one)."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    straight, resumed = tmp_path / "bf16", tmp_path / "bf16_resumed"
    run_torchrun(_args(gem_hf_checkpoint, corpus, straight, "--bf16"), nproc=2)
    m = _metrics(straight)
    assert [r["phase"] for r in m] == [1, 1, 2, 2] and all(r["cl_loss"] is not None for r in m[2:])
    saved = FileSystemReader(str(straight / "global_step2")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in saved.items() if hasattr(v, "properties") and hasattr(v.properties, "dtype")}
    assert {d for k, d in dtypes.items() if not k.startswith("optimizer")} == {torch.bfloat16} and "logit_scale.log_scale" in dtypes
    assert {d for k, d in dtypes.items() if k.startswith("optimizer")} == {torch.float32}
    # the step-2 checkpoint alone, resumed: what a run stopped after step 2 leaves
    resumed.mkdir()
    shutil.copytree(straight / "global_step2", resumed / "global_step2")
    (resumed / "latest").write_text("global_step2")
    run_torchrun(_args(gem_hf_checkpoint, corpus, resumed, "--bf16", "--load", str(resumed)), nproc=2)
    got = _metrics(resumed)
    assert [r["step"] for r in got] == [3, 4]
    for ra, rb in zip(m[2:], got, strict=True):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    assert _valid(resumed) == _valid(straight)[1:]
    a, b = _weights(straight), _weights(resumed)
    assert sorted(a) == sorted(b) and {t.dtype for t in a.values()} == {torch.bfloat16}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_parameters_outside_the_model_dtype_are_refused_at_build():
    """The engine's check before megatron-core's optimizer is built: a trained parameter in
    another dtype than params_dtype would crash the first checkpoint save; frozen ones may."""
    from megatron_gem.training.megatron_engine import check_trained_dtype

    bf16 = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    fp32 = torch.nn.Parameter(torch.zeros(1))
    check_trained_dtype([("w", bf16), ("frozen", fp32.requires_grad_(False))], torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"not in the model's bfloat16 .*: scale \(float32\)"):
        check_trained_dtype([("w", bf16), ("scale", fp32.requires_grad_(True))], torch.bfloat16)


def test_supervised_pairs_in_phase_two(reference, gem_hf_checkpoint, tiny_teacher, tmp_path, corpus):
    """--contrastive-data through megatron-core: phase 1 unchanged, phase 2 trains on the pairs,
    with hard negatives (one per odd record, none on even ones: counted) and GradCache chunks,
    distilling a teacher (#28: its KL mixed with InfoNCE on the pairs) that never reaches the
    export or the checkpoint."""
    from megatron_gem.testing import sample_sentences

    pairs = tmp_path / "pairs.jsonl"
    texts = sample_sentences(40, seed=8)
    records = [{"query": f"item {i}", "positive": s, **({"negative": texts[(i + 11) % 40]} if i % 2 else {})} for i, s in enumerate(texts)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    save = tmp_path / "pairs_run"
    extra = (
        "--contrastive-data",
        str(pairs),
        "--contrastive-query-prompt",
        "query: ",
        "--contrastive-negative-field",
        "negative",
        "--contrastive-micro-batch-size",
        "3",
        "--contrastive-teacher",
        tiny_teacher,
        "--contrastive-teacher-weight",
        "0.5",
    )
    proc = run_torchrun(_args(gem_hf_checkpoint, corpus, save, *extra))
    assert "contrastive loss: 0.5 x teacher + 0.5 x InfoNCE, teacher temperature 0.05; no cache" in proc.stdout, proc.stdout[-3000:]
    # phase 2: 2 steps x 4 micro-batches x (4 queries + 4 positives + their hard negatives), each embedded once
    computed = int(re.search(r"'teacher_texts_cached': 0, 'teacher_texts_computed': (\d+)", proc.stdout).group(1))
    assert 64 < computed <= 64 + 2 * 4 * 4, computed
    assert "phase-2 pairs (40)" in proc.stdout and "[pairs] documents skipped: 0" in proc.stdout, proc.stdout[-3000:]
    assert "[pairs] hard negatives: 20 (records without any: 20, empty strings dropped: 0)" in proc.stdout, proc.stdout[-3000:]
    ref, m = _metrics(reference), _metrics(save)
    _close(ref[:2], m[:2])
    assert [r["phase"] for r in m] == [1, 1, 2, 2]
    assert all(abs(a["cl_loss"] - b["cl_loss"]) > 1e-3 for a, b in zip(ref[2:], m[2:]))
    assert_embedder_ready(save / "hf", query_prompt="query: ")
    # Nothing of the teacher (a BERT) in the export or the checkpoint: the student's tensors only.
    assert sorted(_weights(save)) == sorted(_weights(gem_hf_checkpoint, sub="."))
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(save / "global_step4")).read_metadata().state_dict_metadata
    model_keys = {k.split("/")[0] for k in keys if not k.startswith("optimizer")}
    assert model_keys and all(k.startswith(("embedding.", "decoder.", "output_layer.", "logit_scale.")) for k in model_keys), sorted(model_keys)


def test_k2_export_with_a_query_prompt_is_embedder_ready(tiny_inputs, corpus, tmp_path):
    """K=2 (tokens added with mean rows by the engine) and a query prompt on the self-supervised
    anchors: the export loads as SentenceTransformer with the custom GEM module and the prompt."""
    save = tmp_path / "k2"
    extra = ["--gem-num-special-tokens", "2", "--contrastive-query-prompt", "query: ", "--train-iters", "2", "--gem-contrastive-from-step", "1"]
    run_torchrun(_args(tiny_inputs["model"], corpus, save, *extra))
    assert [r["phase"] for r in _metrics(save)] == [1, 2]
    assert_embedder_ready(save / "hf", query_prompt="query: ")


def test_tp2_nan_on_one_rank_stops_all_and_damaged_checkpoints_are_refused(reference, gem_hf_checkpoint, corpus, tmp_path):
    """TP=2: a NaN loss on rank 1 at step 3 stops both ranks before saving (latest stays at
    step 2); resuming without the fault (and with GradCache chunks) gives the uninterrupted numbers; then a flipped byte in
    the step-4 checkpoint is refused naming the file, and the fallback is step 2."""
    save = tmp_path / "tp2"
    args = _args(gem_hf_checkpoint, corpus, save, "--tensor-model-parallel-size", "2")
    args[0] = "tests/training/fault_train.py"
    proc = run_torchrun(args, nproc=2, check=False, env={"MG_FAULT": "nan@3:1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "step 3 (phase 2): non-finite loss on rank(s) 1," in errors[0], proc.stderr[-3000:]
    assert "still names global_step2" in errors[0]
    assert (save / "latest").read_text().strip() == "global_step2" and not (save / "global_step4").exists()
    # The resumed run (phase 2, steps 3-4) embeds its 4 texts in GradCache chunks of 2
    # (--contrastive-micro-batch-size; not part of the checkpointed state): the unchunked
    # single-process numbers and trained weights still come out.
    args[0] = "train.py"
    run_torchrun(args + ["--load", str(save), "--contrastive-micro-batch-size", "2"], nproc=2)
    _close(_metrics(reference), _metrics(save))
    a, b = _weights(reference), _weights(save)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    _close(_valid(reference), _valid(save))  # TP=2: step 2's from the failed run, step 4's after the resume

    # What --load does first (the trainer's resolve_checkpoint, shared by both engines; the
    # DeepSpeed tests run it through train.py): a flipped byte in a shard is refused naming the
    # shard, and the fallback is the newest earlier complete checkpoint.
    from megatron_gem.common.manifest import CheckpointError
    from megatron_gem.training.checkpoint import resolve_checkpoint

    shard = max((save / "global_step4").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content does not match its sha256") as e:
        resolve_checkpoint(str(save), log=lambda *_: None)
    assert str(shard) in str(e.value)
    assert resolve_checkpoint(str(save), fallback=True, log=lambda *_: None) == "global_step2"
