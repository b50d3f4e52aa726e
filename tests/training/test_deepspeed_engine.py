"""End-to-end GEM training through train.py: ZeRO-3 on 2 processes vs 1, resume, export,
validation during training (--split, --eval-interval) and W&B logging (offline)."""

import glob
import json
import os
import re
import struct

import pytest
import torch

from tests.embedder_checks import assert_embedder_ready
from tests.launch import REPO, base_args, launch
from tests.launch import read_metrics as read_all_records

DS_ZERO3 = os.path.join(REPO, "ds_zero3.json")
# Validation in every run of this module (the same training documents in all of them): 30 of
# the 300 documents held out, validated after steps 3 and 6 on 2 global batches.
VALIDATION = {"--split": "90,10,0", "--eval-interval": 3, "--eval-iters": 2}
VOLATILE = ("tokens_per_s", "step_time_s")


def read_metrics(save) -> list[dict]:
    """The training records of metrics.jsonl."""
    return [m for m in read_all_records(save) if "loss" in m]


def read_validation(save) -> list[dict]:
    return [m for m in read_all_records(save) if "valid_ntp_loss" in m]


def assert_validation_close(a: list[dict], b: list[dict], rel: float) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k, v in x.items():
            assert (y[k] is None) if v is None else (y[k] == pytest.approx(v, rel=rel)), (k, x, y)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


@pytest.fixture(scope="module")
def single_run(tiny_inputs, tmp_path_factory):
    save = tmp_path_factory.mktemp("single")
    wandb = {"--wandb-project": "gem-tests", "--wandb-exp-name": "single", "--wandb-save-dir": str(save / "wb")}
    ok(launch(base_args(tiny_inputs, save, **{"--deepspeed": DS_ZERO3}, **VALIDATION, **wandb), env={"WANDB_MODE": "offline"}))
    return save


def assert_same_weights(run_a, run_b, rel=1e-4):
    """The HF exports of two runs hold the same parameters (fp32 sums in another order)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(run_a, "hf", "model.safetensors")), load_file(os.path.join(run_b, "hf", "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, (k, float((a[k] - b[k]).abs().max()), scale)


@pytest.mark.multiprocess
def test_two_process_zero3_gradcache_equals_single_process(single_run, tiny_inputs, tmp_path):
    # Same global batches: 1 rank x 4 rows vs 2 ranks x 2 rows; contrastive 8 texts vs 2 x 4
    # with negatives gathered across ranks, each rank's 4 embedded in GradCache chunks of 2
    # (--contrastive-micro-batch-size) against the unchunked single process. The losses must
    # agree step by step and the trained weights at the end.
    # Checkpoints after steps 2, 4 and 6, the newest 2 kept (--save-total-limit, after each
    # save is complete and latest moved); a directory the run did not write stays.
    save = tmp_path / "zero3_dp2"
    (save / "global_step2_copy").mkdir(parents=True)
    args = base_args(
        tiny_inputs,
        save,
        **{"--deepspeed": DS_ZERO3, "--micro-batch-size": 2, "--contrastive-batch-size": 4, "--contrastive-micro-batch-size": 2},
        # --overwrite-output-dir: a --save that is not empty starts only with it (#25)
        **{"--save-interval": 2, "--save-total-limit": 2, "--overwrite-output-dir": True},
        **VALIDATION,
    )
    proc = ok(launch(args, nproc=2, launcher="deepspeed"))
    assert "ZeRO-3, dp=2" in proc.stdout
    assert "--save-total-limit 2: deleted global_step2; kept global_step6, global_step4" in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2_copy", "global_step4", "global_step6"]
    assert open(save / "latest").read().strip() == "global_step6"
    # The jsonl input was tokenised once, by rank 0, into <--save>/data_cache; both ranks read it.
    assert f"[data cache] built {save / 'data_cache' / 'data-'}" in proc.stdout, proc.stdout[-3000:]
    one, two = read_metrics(single_run), read_metrics(save)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        assert a["phase"] == b["phase"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    assert [m["phase"] for m in one] == [1, 1, 1, 2, 2, 2]
    assert one[2]["ntp_loss"] < one[0]["ntp_loss"] and one[5]["cl_loss"] < one[3]["cl_loss"]
    assert_same_weights(single_run, save)
    # The validation figures: the same held-out batches, reduced over the two ranks (sums and
    # counts), and in-batch negatives gathered over them, give the one-process figures.
    assert_validation_close(read_validation(single_run), read_validation(save), rel=2e-5)


def test_validation_figures(single_run):
    """After steps 3 and 6: both layouts' NTP loss and the contrastive metric of held-out texts,
    from 2 global batches of 4 rows and 2 x 8 self-supervised pairs of the 30 held-out docs."""
    v3, v6 = read_validation(single_run)
    assert (v3["step"], v6["step"]) == (3, 6)
    for v in (v3, v6):
        assert v["valid_ntp_tokens_plain"] > 0 and v["valid_ntp_tokens_gem"] > 0 and v["valid_cl_texts"] == 16
        total = v["valid_ntp_tokens_plain"] + v["valid_ntp_tokens_gem"]
        mixed = (v["valid_ntp_loss_plain"] * v["valid_ntp_tokens_plain"] + v["valid_ntp_loss_gem"] * v["valid_ntp_tokens_gem"]) / total
        assert v["valid_ntp_loss"] == pytest.approx(mixed, rel=1e-12)
        assert 0.0 <= v["valid_cl_top1"] <= 1.0 and v["valid_cl_loss"] > 0
    assert {k: v for k, v in v3.items() if "tokens" in k or "texts" in k} == {k: v for k, v in v6.items() if "tokens" in k or "texts" in k}
    assert v6["valid_cl_loss"] < v3["valid_cl_loss"]  # phase 2 (steps 4-6) trained the embeddings


def test_validation_leaves_training_untouched(single_run, tiny_inputs, tmp_path):
    # The same run without validation (--eval-iters 0; the split still holds the documents out)
    # trains exactly the same: validation has its own data, restores the RNG, no gradient.
    save = tmp_path / "no_validation"
    proc = ok(launch(base_args(tiny_inputs, save, **{"--deepspeed": DS_ZERO3, **VALIDATION, "--eval-iters": 0})))
    assert "validation: none" in proc.stdout and not read_validation(save)
    with_v, without = read_metrics(single_run), read_metrics(save)
    assert len(with_v) == len(without) == 6
    for a, b in zip(with_v, without):
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}


def wandb_history(run_file: str) -> dict[int, dict]:
    """step -> logged values, read from a W&B run file (.wandb): W&B's LevelDB-log framing
    (7-byte file header ':W&B' + magic + version; 32 KiB blocks of records, each with a 7-byte
    header: crc32, length, kind FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), run_file
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    history = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = row
    return history


def test_wandb_offline_run_holds_the_metrics_records(single_run):
    (run_file,) = glob.glob(str(single_run / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    records = read_all_records(single_run)
    assert sorted(history) == sorted({m["step"] for m in records}) == [1, 2, 3, 4, 5, 6]
    for m in records:  # training and validation records of one step share the W&B row
        logged = {k: v for k, v in m.items() if k != "step" and v is not None}
        assert {k: history[m["step"]][k] for k in logged} == logged, (m, history[m["step"]])


def test_export_is_a_gem_checkpoint(single_run, tiny_inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem import GEMConfig, GEMEmbedder

    hf = os.path.join(single_run, "hf")
    assert sorted(f for f in os.listdir(hf) if f.endswith(".safetensors")) == ["model.safetensors"]
    cfg = GEMConfig.load(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.convert_ids_to_tokens(cfg.special_token_ids) == ["<|gem_0|>"]
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    emb = GEMEmbedder.from_pretrained(hf).encode(["The cat runs.", "Rain falls on the old house."])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the export generates as an ordinary causal LM
    out = model.generate(torch.tensor([tok("The cat")["input_ids"]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(tok("The cat")["input_ids"]) + 3
    # embedder-ready: SentenceTransformer(hf) (builtin modules, K=1) gives GEMEmbedder's vectors
    assert_embedder_ready(hf)
    card = open(os.path.join(hf, "README.md")).read()
    assert "steps: 6 of 6 (train.py, deepspeed engine)" in card and f"`{tiny_inputs['model']}`" in card and f"`{tiny_inputs['data']}`" in card


def test_resume_equals_uninterrupted(single_run, tiny_inputs, tmp_path):
    save = tmp_path / "resumed"
    args = base_args(tiny_inputs, save, **{"--deepspeed": DS_ZERO3}, **VALIDATION)
    first = ok(launch(args + ["--exit-after-iters", "4", "--save-interval", "2"]))
    assert open(save / "latest").read().strip() == "global_step4"
    proc = ok(launch(args + ["--load", str(save)]))
    assert "steps 4->6" in proc.stdout
    # The second leg reads the tokens the first one cached (same input, same tokenizer).
    assert "[data cache] built" in first.stdout and "[data cache] reused" in proc.stdout and "tokenising" not in proc.stdout
    straight, resumed = read_metrics(single_run), read_metrics(save)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a, b)
    # validation after steps 3 and 6 as in the straight run, plus one at the end of the first leg
    valid = read_validation(save)
    assert [m["step"] for m in valid] == [3, 4, 6]
    assert_validation_close(read_validation(single_run), [valid[0], valid[2]], rel=1e-6)


def test_plain_python_without_deepspeed_config_and_gradcache_equals_zero3(single_run, tiny_inputs, tmp_path):
    # no --deepspeed: ZeRO-0, plain fp32; phase 2's 8 texts in GradCache chunks of 3, 3 and 2
    save = tmp_path / "plain"
    proc = ok(launch(base_args(tiny_inputs, save, **{"--contrastive-micro-batch-size": 3}, **VALIDATION)))  # no --deepspeed: ZeRO-0, plain fp32
    assert "ZeRO-0, dp=1" in proc.stdout
    for a, b in zip(read_metrics(single_run), read_metrics(save)):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert_validation_close(read_validation(single_run), read_validation(save), rel=2e-5)
    assert os.path.isfile(save / "hf" / "gem_config.json")
    assert_same_weights(single_run, save)


def _megatron_prefix(tiny_inputs, tmp_path) -> str:
    from transformers import AutoTokenizer

    from megatron_gem.data.preprocess import preprocess_to_indexed
    from megatron_gem.testing import sample_sentences

    text = tmp_path / "other.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(120, seed=21)))
    return preprocess_to_indexed(str(text), AutoTokenizer.from_pretrained(tiny_inputs["model"]), str(tmp_path / "other"), progress=False)[0]


def test_alpha_below_one_keeps_next_token_loss_in_phase_two(tiny_inputs, tmp_path):
    # Trained on a --data-path blend of the jsonl file and a Megatron prefix (the loss split
    # asserted below does not depend on the data): the banner reports each source's share.
    save, prefix, data = tmp_path / "alpha", _megatron_prefix(tiny_inputs, tmp_path), tiny_inputs["data"]
    args = base_args(tiny_inputs, save, **{"--data": None, "--train-iters": 2, "--gem-contrastive-from-step": 1, "--gem-alpha": 0.25})
    proc = ok(launch(args + ["--data-path", "0.7", data, "0.3", prefix]))
    (total,) = re.findall(r"\[blend\] 2 sources, (\d+) samples per blend epoch \(weighted\)", proc.stdout)
    for path, weight in ((data, 0.7), (prefix, 0.3)):
        (count,) = re.findall(rf"\[blend\]   {re.escape(path)} \(weight {weight}\): (\d+) samples per blend epoch", proc.stdout)
        assert abs(int(count) - weight * int(total)) < 1, proc.stdout[-3000:]
    assert "[blend] " + prefix + ": 120 documents read, 0 skipped" in proc.stdout
    first, second = read_metrics(save)
    assert first["phase"] == 1 and first["cl_loss"] is None
    assert second["phase"] == 2 and second["ntp_loss"] is not None and second["cl_loss"] is not None
    assert second["loss"] == pytest.approx(0.75 * second["ntp_loss"] + 0.25 * second["cl_loss"], rel=1e-9)


def test_supervised_pairs_drive_phase_two(single_run, tiny_inputs, tmp_path):
    # Phase 2 on --contrastive-data pairs: phase 1 is untouched (same losses as the
    # self-supervised run), phase 2 trains on the pairs, and a bad record is skipped and counted.
    # --split holds out the last 8 of the 80 pairs too: the validation contrastive metric is
    # measured on them (the NTP validation on the same held-out documents as the other runs).
    from megatron_gem.testing import sample_sentences

    # Hard negatives (--contrastive-negative-field): a string, a list, or none (counted), with
    # GradCache chunks of 3.
    pairs = tmp_path / "pairs.jsonl"
    texts = sample_sentences(80, seed=9)
    with open(pairs, "w") as f:
        for i, s in enumerate(texts):
            record = {"question": f"what is said in item {i}?", "answer": s}
            if i % 2:
                record["hard"] = [texts[(i + 7) % 80], texts[(i + 9) % 80]] if i % 4 == 1 else texts[(i + 3) % 80]
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"question": "a record without its answer"}) + "\n")
    save = tmp_path / "pairs_run"
    extra = {
        "--deepspeed": DS_ZERO3,
        "--contrastive-data": str(pairs),
        "--contrastive-query-field": "question",
        "--contrastive-positive-field": "answer",
        "--contrastive-negative-field": "hard",
        "--contrastive-micro-batch-size": 3,
        "--skip-bad-records": True,
        "--contrastive-query-prompt": "question: ",
        **VALIDATION,
    }
    proc = ok(launch(base_args(tiny_inputs, save, **extra)))
    assert "phase-2 pairs (72)" in proc.stdout and "skipped: 1 (missing_field: 1)" in proc.stdout, proc.stdout[-3000:]
    assert "[pairs] hard negatives: 60 (records without any: 40, empty strings dropped: 0)" in proc.stdout, proc.stdout[-3000:]
    assert "contrastive: the valid part of --contrastive-data (8 pairs)" in proc.stdout, proc.stdout[-3000:]
    straight, paired = read_metrics(single_run), read_metrics(save)
    assert [m["phase"] for m in paired] == [1, 1, 1, 2, 2, 2]
    for a, b in zip(straight[:3], paired[:3]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), (a, b)
    assert all(abs(b["cl_loss"] - a["cl_loss"]) > 1e-3 for a, b in zip(straight[3:], paired[3:]))
    # That phase 2 learns is judged on the fixed held-out pairs below (training batches differ
    # step to step, and hard negatives make their losses differ more).
    assert_embedder_ready(save / "hf", query_prompt="question: ")  # the prompt travels into the export
    v3, (p3, p6) = read_validation(single_run)[0], read_validation(save)
    for k in ("valid_ntp_loss_plain", "valid_ntp_loss_gem"):  # phase 1 trained the same weights
        assert p3[k] == pytest.approx(v3[k], rel=2e-5)
    assert p3["valid_cl_texts"] == 16 and abs(p3["valid_cl_loss"] - v3["valid_cl_loss"]) > 1e-3  # held-out pairs, not views
    assert p6["valid_cl_loss"] < p3["valid_cl_loss"]


def test_bf16_zero3_trains_both_phases_and_exports(tiny_inputs, tmp_path):
    """--bf16 under ZeRO-3, the recipe of every GPU cluster run: DeepSpeed's bf16 optimizers
    flatten all trainable parameters into one bf16 buffer, so a parameter of another dtype (the
    logit scale was fp32) failed their assertion at start-up."""
    save = tmp_path / "bf16"
    ok(launch(base_args(tiny_inputs, save, **{"--deepspeed": DS_ZERO3, "--bf16": True, "--save-interval": 6})))
    records = read_metrics(save)
    assert [m["phase"] for m in records] == [1, 1, 1, 2, 2, 2]
    assert all(m["loss"] == m["loss"] and abs(m["loss"]) != float("inf") for m in records)
    assert all(m["logit_scale"] is not None and 1.0 <= m["logit_scale"] <= 100.0 for m in records[3:])
    from safetensors.torch import load_file

    weights = load_file(os.path.join(save, "hf", "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
