"""Summary mode through train.py (DeepSpeed, both phases), issue #17's proofs: the base model
is untouched (its parameters and its plain-text logits bit-identical to the original checkpoint
after a 2-process ZeRO-3 run), only the adapter and the logit scale are optimised, DeepSpeed
checkpoints carry no frozen weight and still resume exactly, and 2 processes equal 1.

Three launches: a 1-process ZeRO-3 run (checkpoints at steps 3 and 6), a resume of its step-3
checkpoint in a fresh directory, and the 2-process ZeRO-3 run (with GradCache chunks on the
phase-2 fast path). Every run distils a teacher in phase 2 (#28: a tiny sentence-transformers
model, --contrastive-teacher-weight 0.5, i.e. mixed with InfoNCE): the same proofs hold with it,
2 processes still equal 1, the resumed run takes the teacher's rows from the cache the first run
wrote (the same training), and nothing of the teacher is optimised, checkpointed or exported."""

import json
import os
import pathlib
import shutil

import pytest
import torch

from tests.launch import REPO, base_args, launch, read_metrics

DS_ZERO3 = os.path.join(REPO, "ds_zero3.json")
PROBE = os.path.join(REPO, "tests", "training", "summary_probe.py")
SUMMARY = {"--deepspeed": DS_ZERO3, "--gem-train": "summary", "--gem-summary-tokens": "<unk>", "--gem-adapter-rank": 4}
VOLATILE = ("tokens_per_s", "step_time_s")


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def probe_text(tok):
    return tok("The old dog sleeps near the river while the rain falls.")["input_ids"]


def adapter_weights(save):
    """The exported adapter (PEFT's key names) under the trained module's own names
    ("deltas.<key>.lora_A"), as the optimizer and the DeepSpeed checkpoint name them."""
    from safetensors.torch import load_file

    from megatron_gem.gem.adapter import adapter_key
    from megatron_gem.hf.summary_files import PEFT_PREFIX

    out = {}
    for k, v in load_file(os.path.join(save, "hf", "adapter_model.safetensors")).items():
        assert k.startswith(PEFT_PREFIX) and k.endswith(".weight"), k
        name, part = k[len(PEFT_PREFIX) : -len(".weight")].rsplit(".", 1)
        out[f"deltas.{adapter_key(name)}.{part}"] = v
    return out


@pytest.fixture(scope="module")
def runs(tiny_inputs, tiny_teacher, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("summary_mode")
    ids = ",".join(map(str, probe_text(AutoTokenizer.from_pretrained(tiny_inputs["model"]))))
    one, two, resumed = root / "one", root / "two", root / "resumed"
    teacher = {"--contrastive-teacher": tiny_teacher, "--contrastive-teacher-weight": 0.5}
    cached = {**SUMMARY, **teacher, "--contrastive-teacher-cache": str(root / "teacher_cache")}  # the resumed run reads what this one wrote
    p1 = ok(launch(base_args(tiny_inputs, one, **cached), script=PROBE, env={"MG_PROBE_OUT": str(root / "probe_one"), "MG_PROBE_TEXT_IDS": ids}))
    # 2 ranks with GradCache chunks of 2 texts on the fast path: exact, so still the 1-process run
    dp2 = {**SUMMARY, **teacher, "--micro-batch-size": 2, "--contrastive-batch-size": 4, "--contrastive-micro-batch-size": 2}
    p2 = ok(
        launch(
            base_args(tiny_inputs, two, **dp2),
            nproc=2,
            launcher="deepspeed",
            script=PROBE,
            env={"MG_PROBE_OUT": str(root / "probe_two"), "MG_PROBE_TEXT_IDS": ids},
        )
    )
    # Resume the 1-process run's step-3 checkpoint (saved without the frozen base) elsewhere.
    resumed.mkdir()
    shutil.copytree(one / "global_step3", resumed / "global_step3")
    (resumed / "latest").write_text("global_step3")
    p3 = ok(launch(base_args(tiny_inputs, resumed, **cached) + ["--load", str(resumed), "--hf-export-self-contained"]))
    return {
        "one": one,
        "two": two,
        "resumed": resumed,
        "probe_one": root / "probe_one",
        "probe_two": root / "probe_two",
        "logs": (p1, p2, p3),
        "teacher": tiny_teacher,
    }


def teacher_tensor_names(folder) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in pathlib.Path(folder).rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names |= set(st.keys())
    assert names
    return names


@pytest.mark.multiprocess
def test_base_model_is_bit_identical_after_zero3_training(runs, tiny_inputs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.attention.hf import use_gem_attention

    original = load_file(os.path.join(tiny_inputs["model"], "model.safetensors"))
    for probe in (runs["probe_one"], runs["probe_two"]):
        trained = load_file(probe / "lm_state.safetensors")
        assert set(trained) == set(original)
        assert all(torch.equal(trained[k], original[k]) for k in original), probe
    # Plain-text logits of the trained run's model (2-process ZeRO-3) = the original model's.
    tok = AutoTokenizer.from_pretrained(tiny_inputs["model"])
    model = use_gem_attention(AutoModelForCausalLM.from_pretrained(tiny_inputs["model"], dtype=torch.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs' thread count (OMP_NUM_THREADS=1): same reduction order
    try:
        with torch.no_grad():
            want = model(input_ids=torch.tensor([probe_text(tok)]), use_cache=False).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(load_file(runs["probe_two"] / "plain_logits.safetensors")["logits"], want)
    # ... while the summary states did train: the adapter moved away from B = 0.
    assert any(float(v.abs().sum()) > 0 for k, v in adapter_weights(runs["two"]).items() if k.endswith("lora_B"))


@pytest.mark.multiprocess
def test_only_adapter_and_logit_scale_are_optimised_and_checkpointed(runs):
    weights = adapter_weights(runs["one"])
    adapter = {f"adapter.{k}" for k in weights}
    for probe in (runs["probe_one"], runs["probe_two"]):
        assert set(json.load(open(probe / "optimizer.json"))) == adapter | {"logit_scale.log_scale"}
    for save in (runs["one"], runs["two"]):
        cfg = json.load(open(save / "hf" / "gem_config.json"))
        assert cfg["train_mode"] == "summary" and cfg["summary_tokens"] == ["<unk>"] and cfg["base_model"]
        for name in os.listdir(save / "global_step6"):
            if name.endswith("model_states.pt"):
                state = torch.load(save / "global_step6" / name, weights_only=False)  # our own DeepSpeed file
                assert set(state["module"]) == adapter | {"logit_scale.log_scale"}, name
                assert not state.get("frozen_param_fragments") and not state.get("frozen_param_shapes")
        assert not any(f.endswith(".safetensors") and f != "adapter_model.safetensors" for f in os.listdir(save / "hf"))
        assert not any("teacher" in k or "encoder.layer" in k for k in adapter_weights(save))  # nothing of the teacher (a BERT) in the export
    assert not any(n in k for n in teacher_tensor_names(runs["teacher"]) for k in weights)
    p1 = runs["logs"][0].stdout
    assert "[phase 1] summary mode: every piece gets the 'split' layout" in p1 and "skipped as too short" in p1


@pytest.mark.multiprocess
def test_two_process_zero3_equals_one_process(runs):
    one, two = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert [m["phase"] for m in one] == [m["phase"] for m in two] == [1, 1, 1, 2, 2, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    w1, w2 = adapter_weights(runs["one"]), adapter_weights(runs["two"])
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.multiprocess
def test_resume_from_a_checkpoint_without_the_base_is_exact(runs):
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    assert "steps 3->6" in runs["logs"][2].stdout
    # Steps 4-6 of 8 self-supervised texts (anchors and their views: one text each): every
    # teacher row of the resumed run came from the cache the first run wrote, none was computed.
    assert "'teacher_texts_cached': 48, 'teacher_texts_computed': 0" in runs["logs"][2].stdout, runs["logs"][2].stdout[-2000:]
    assert "'teacher_texts_cached': 0, 'teacher_texts_computed': 48" in runs["logs"][0].stdout
    assert [strip(r) for r in read_metrics(runs["resumed"])] == [strip(r) for r in read_metrics(runs["one"])[3:]]
    w1, w3 = adapter_weights(runs["one"]), adapter_weights(runs["resumed"])
    assert set(w1) == set(w3) and all(torch.equal(w1[k], w3[k]) for k in w1)


@pytest.mark.multiprocess
def test_self_contained_export_carries_the_base_and_embeds_alone(runs, tiny_inputs):
    """--hf-export-self-contained (the resumed run): hf/base/ holds the original weights, and the
    folder embeds without the base directory exactly as the adapter on the base does."""
    from safetensors.torch import load_file

    from megatron_gem.embedder import GEMEmbedder

    base = runs["resumed"] / "hf" / "base"
    orig = {k: v for f in sorted(pathlib.Path(tiny_inputs["model"]).glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert orig and sorted(got) == sorted(orig) and all(torch.equal(got[k], orig[k]) for k in orig)
    assert not (runs["one"] / "hf" / "base").exists()
    alone = GEMEmbedder.from_pretrained(str(runs["resumed"] / "hf"))
    on_base = GEMEmbedder.from_pretrained(str(runs["one"] / "hf"), base=tiny_inputs["model"])
    assert str(base) in str(alone.base_path)
    texts = ["a cat sat on the mat", "the dog ran home"]
    assert torch.equal(alone.encode(texts), on_base.encode(texts))
