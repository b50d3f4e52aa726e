"""Summary mode (a trained adapter on a frozen base) through megatron-core's engine on CPU/gloo:
only the adapter trains and the base stays exact; the phase-2 fast path equals its full rows
(also with GradCache chunks); TP=2 x PP=2 with recomputation, stopped and resumed, gives the
single-process run (make test-long); a single-process resume is exact. Apart from test_megatron_engine.py (which
it shares train.py's arguments with, tests/training/megatron_runs.py) so that the two files run
on the two test processes side by side."""

import pytest
import torch

from tests.launch import run_torchrun
from tests.training.megatron_runs import VOLATILE, write_corpus
from tests.training.megatron_runs import close as _close
from tests.training.megatron_runs import metrics as _metrics
from tests.training.megatron_runs import train_args as _args
from tests.training.megatron_runs import weights as _weights


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mg_data"))


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


# long (make test-long): 2 x 4 ranks; TP=2 x PP=2 equal to one process is make test's in full
# mode (test_megatron_engine), summary mode's exact resume below.
@pytest.mark.long
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
