"""megatron-core GEM training on CPU/gloo: TP=2 x PP=2 and TP=2 x DP=2 (sequence parallel,
recomputation, distributed optimizer) give the single-process numbers, validation figures
included (every run validates on --valid-data after steps 2 and 4); exact resume (also in bf16);
export."""

import json
import re

import pytest
import torch

from tests.embedder_checks import assert_embedder_ready
from tests.launch import run_torchrun

VOLATILE = ("tokens_per_s", "step_time_s")


def _args(model, data, save, *extra):
    return [
        "train.py",  # the user's entry: the parallelism flag below selects megatron-core
        "--model", str(model), "--data", str(data), "--save", str(save),
        "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "4", "--gem-contrastive-from-step", "2", "--gem-alpha", "0.5",
        "--contrastive-batch-size", "4", "--contrastive-max-length", "24",
        "--lr", "1e-3", "--contrastive-lr", "1e-3", "--log-interval", "1", "--save-interval", "2",
        "--attention-backend", "sdpa", "--no-progress", "--tensor-model-parallel-size", "1",
        "--valid-data", str(data.parent / "valid.jsonl"), "--eval-interval", "2", "--eval-iters", "1", *extra,
    ]  # fmt: skip


def _records(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def _metrics(save):
    """The training records."""
    return [r for r in _records(save) if "loss" in r]


def _valid(save):
    """The validation records."""
    return [r for r in _records(save) if "valid_ntp_loss" in r]


def _close(a, b, rel=2e-5):
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k in VOLATILE or v is None or isinstance(v, str):
                assert v == rb[k] or k in VOLATILE, (k, ra, rb)
                continue
            assert rb[k] == pytest.approx(v, rel=rel, abs=1e-7), (ra["step"], k, v, rb[k])


def _weights(directory, sub="hf"):
    """All tensors of an HF export (one file, or one shard per pipeline stage)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((directory / sub).glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {directory / sub}"
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_gem.testing import sample_sentences

    path = tmp_path_factory.mktemp("mg_data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(200, seed=5, min_words=8, max_words=30)))
    (path.parent / "valid.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(30, seed=6, min_words=8, max_words=30)))
    return path


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


# ------------------------------------------------------------------------------ summary mode
# alpha 0.5: phase 2 takes the fast path (no-grad prefill + summary step) for its contrastive
# rows and a schedule of their own for its NTP rows
SUMMARY = ("--gem-train", "summary", "--gem-adapter-rank", "4", "--gem-alpha", "0.5")


@pytest.fixture(scope="module")
def summary_reference(gem_hf_checkpoint, corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("mg_summary") / "run"
    proc = run_torchrun(_args(gem_hf_checkpoint, corpus, save, *SUMMARY))
    return save, proc.stdout


def _adapter(directory):
    """The exported adapter under HF module names (PEFT's key prefix dropped)."""
    from safetensors.torch import load_file

    from megatron_gem.hf.summary_files import PEFT_PREFIX

    return {k[len(PEFT_PREFIX) :]: v for k, v in load_file(directory / "hf" / "adapter_model.safetensors").items()}


def test_summary_mode_trains_only_the_adapter_and_keeps_the_base_exact(summary_reference, gem_hf_checkpoint):
    """Single process: grad buffers and optimizer hold exactly the adapter (+ logit scale); the
    export is the HF-named adapter alone; on the HF base model it changes GEM layouts and leaves
    plain text (what generation computes) bit for bit the base model's."""
    from transformers import AutoModelForCausalLM

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.summary import attach_summary_adapter, logits_of
    from megatron_gem.mcore.summary import load_hf_adapter_state

    save, stdout = summary_reference
    m = _metrics(save)
    assert [r["phase"] for r in m] == [1, 1, 2, 2] and all(r["grad_norm"] > 0 for r in m) and m[3]["logit_scale"] != 20.0
    state = _adapter(save)
    # megatron holds one A per fused layer (q/k/v and gate/up share theirs in the HF names)
    shared = ("q_proj", "o_proj", "gate_proj", "down_proj")
    expected = sum(t.numel() for k, t in state.items() if "lora_B" in k or k.split(".")[-3] in shared) + 1  # + the logit scale
    assert f"trainable {expected}, in grad buffers {expected}, in the optimizer {expected} elements" in stdout, stdout[-3000:]
    # the layer implementation chosen from the fused kernels here (mcore/fused.py), and the Adam
    assert "layers: local (no GPU: the fused kernels are CUDA kernels); Adam: torch.optim.adamw.AdamW)" in stdout, stdout[-3000:]
    assert not list((save / "hf").glob("model*.safetensors"))  # the base is --model, not re-exported
    cfg = GEMConfig.load(save / "hf")
    base_ids = GEMConfig.load(gem_hf_checkpoint).special_token_ids
    assert cfg.train_mode == "summary" and cfg.special_token_ids == base_ids and cfg.summary_tokens == ["<|gem_0|>"]

    base = AutoModelForCausalLM.from_pretrained(gem_hf_checkpoint, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(gem_hf_checkpoint, dtype=torch.float32)
    load_hf_adapter_state(attach_summary_adapter(lm, cfg), state)
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(lm, ids), logits_of(base, ids))
    ids[:, 10] = base_ids[0]
    roles = torch.zeros_like(ids)
    roles[:, 10], roles[:, 11:] = 1, 2
    with torch.no_grad():
        gem = lm(input_ids=ids, doc_ids=torch.zeros_like(ids), roles=roles, use_cache=False).logits
        plain = base(input_ids=ids, use_cache=False).logits
    assert torch.equal(gem[:, :10], plain[:, :10]) and (gem[:, 10:] - plain[:, 10:]).abs().max() > 1e-6


def test_summary_fast_path_equals_full_rows(gem_hf_checkpoint, corpus, tiny_teacher, tmp_path):
    """The phase-2 fast path (a forward-only prefill recording every layer's keys and values,
    then forward and backward of the summary tokens alone; the step's NTP rows in a
    forward-backward schedule of their own) against its reference, the full rows with autograd
    (--no-gem-summary-fast-path), both on 2 data-parallel ranks with the distributed optimizer
    (the NTP schedule's gradients must be reduced once, with the summary step's): the same
    losses, gradient norms and adapter; also with GradCache chunks on the fast path. Every run
    distils a teacher (#28; mixed with InfoNCE, keys of both ranks), whose rows travel with the
    joined rows, the summary step's batch and the GradCache chunks alike."""
    fast, cached, full = tmp_path / "summary_fast_dp2", tmp_path / "summary_fast_gradcache_dp2", tmp_path / "summary_full_rows_dp2"
    teacher = ("--contrastive-teacher", tiny_teacher, "--contrastive-teacher-weight", "0.5")
    fast_stdout = run_torchrun(_args(gem_hf_checkpoint, corpus, fast, *SUMMARY, *teacher), nproc=2).stdout  # the distributed optimizer is the default
    cached_stdout = run_torchrun(_args(gem_hf_checkpoint, corpus, cached, *SUMMARY, *teacher, "--contrastive-micro-batch-size", "2"), nproc=2).stdout
    full_stdout = run_torchrun(_args(gem_hf_checkpoint, corpus, full, *SUMMARY, *teacher, "--no-gem-summary-fast-path"), nproc=2).stdout
    for stdout in (fast_stdout, cached_stdout, full_stdout):
        assert "contrastive loss: 0.5 x teacher + 0.5 x InfoNCE" in stdout, stdout[-3000:]
    assert "DP=2" in fast_stdout and "phase 2: fast path (no-grad prefill, autograd through the summary tokens only; the NTP rows" in fast_stdout
    assert "; GradCache over the summary tokens (--contrastive-micro-batch-size)" in cached_stdout
    assert "phase 2: full rows with autograd (--no-gem-summary-fast-path)" in full_stdout
    for run in (fast, cached):  # GradCache is exact: chunks of 2 texts give the unchunked step
        m = _metrics(run)
        assert [r["phase"] for r in m] == [1, 1, 2, 2] and all(r["cl_loss"] > 0 and r["ntp_loss"] > 0 for r in m[2:])
        _close(_metrics(full), m)
        a, b = _adapter(full), _adapter(run)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (run.name, k, float((a[k] - b[k]).abs().max()))


def test_summary_mode_tp2_pp2_recompute_resume_equals_single_process(summary_reference, converted_checkpoint, gem_hf_checkpoint, corpus, tmp_path):
    """4 processes, TP=2 x PP=2 with full recomputation, from the converted checkpoint, stopped
    after step 2 and resumed (adapter + distributed optimizer from dist_checkpointing): the
    single-process losses and adapter. Checkpoints every step, the newest 2 kept
    (--save-total-limit): steps 3 and 4 remain, each holding only what trains (the frozen base
    is --model, never rewritten); a foreign directory in --save stays."""
    save = tmp_path / "summary_tp2pp2"
    args = _args(converted_checkpoint, corpus, save, *SUMMARY, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    args += ["--recompute-granularity", "full", "--save-interval", "1", "--save-total-limit", "2"]
    run_torchrun(args + ["--exit-after-iters", "2"], nproc=4)
    assert (save / "latest").read_text().strip() == "global_step2" and not (save / "hf").exists()
    # Not written by the run (a --save must be new or empty to start, so it comes in between):
    # rotation never deletes it.
    (save / "global_step1_by_hand").mkdir()
    proc = run_torchrun(args + ["--load", str(save)], nproc=4)
    assert "--save-total-limit 2: deleted global_step2; kept global_step4, global_step3" in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step1_by_hand", "global_step3", "global_step4"]
    ref, _ = summary_reference
    _close(_metrics(ref), _metrics(save))
    a, b = _adapter(ref), _adapter(save)
    assert sorted(a) == sorted(b) and any(float(t.abs().max()) > 1e-4 for k, t in a.items() if "lora_B" in k)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    # The step-4 checkpoint: the adapter's and the logit scale's tensors (and their optimizer
    # state), no base weight; the converter says what it is instead of exporting half a model.
    from torch.distributed.checkpoint import FileSystemReader

    from tests.launch import run_python

    keys = FileSystemReader(str(save / "global_step4")).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if not k.startswith("optimizer")}
    assert model_keys and all(k.startswith(("gem_adapter.", "logit_scale.")) for k in model_keys), sorted(model_keys)[:5]
    assert not any("decoder.layers" in k and "gem_adapter" not in k or "embedding" in k for k in keys), sorted(keys)[:5]
    proc = run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(save / "global_step4"), "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0 and f"not the frozen base (that is {converted_checkpoint}" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_summary_mode_exact_resume(summary_reference, gem_hf_checkpoint, corpus, tmp_path):
    """Single process, killed after step 2 and resumed: the uninterrupted losses and adapter,
    bit for bit (adapter + Adam state from the checkpoint; the base rebuilt equal)."""
    save = tmp_path / "summary_resume"
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, *SUMMARY, "--exit-after-iters", "2"))
    run_torchrun(_args(gem_hf_checkpoint, corpus, save, *SUMMARY, "--load", str(save), "--hf-export-self-contained"))
    ref, _ = summary_reference
    for ra, rb in zip(_metrics(ref), _metrics(save), strict=True):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    a, b = _adapter(ref), _adapter(save)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # --hf-export-self-contained: the base travels in hf/base/ (the original weights) and the
    # folder embeds alone, as the adapter on the original base does.
    from megatron_gem.embedder import GEMEmbedder

    got, orig = _weights(save / "hf", sub="base"), _weights(gem_hf_checkpoint, sub=".")
    assert sorted(got) == sorted(orig) and all(torch.equal(got[k], orig[k]) for k in orig)
    alone = GEMEmbedder.from_pretrained(str(save / "hf"))
    on_base = GEMEmbedder.from_pretrained(str(ref / "hf"), base=str(gem_hf_checkpoint))
    assert str(save / "hf" / "base") in str(alone.base_path)
    texts = ["a cat sat on the mat", "the dog ran home"]
    assert torch.equal(alone.encode(texts), on_base.encode(texts))
