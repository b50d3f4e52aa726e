"""A few HF Trainer / TRL SFTTrainer steps with GEMDataCollator and the GEM trainer class."""

import math
import os

import pytest
import torch

from megatron_gem.gem import IGNORE_INDEX, GEMConfig, Role
from megatron_gem.integrations import GEMDataCollator, GEMTrainer, enable_gem, gem_trainer_class
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences


class RecordingCollator(GEMDataCollator):
    """Keeps every example it was given and every batch it produced."""

    def __call__(self, features):
        batch = super().__call__(features)
        self.seen = getattr(self, "seen", []) + [(features, {k: v.clone() for k, v in batch.items()})]
        return batch


def _assert_prompt_masks_kept(collator):
    checked = 0
    for features, batch in collator.seen:
        for r, f in enumerate(features):
            masked = sum(1 for x in f["labels"] if x == IGNORE_INDEX)
            roles, labels = batch["roles"][r], batch["labels"][r]
            text_labels = labels[(roles != Role.SPECIAL) & (batch["doc_ids"][r] >= 0)]
            assert (text_labels[:masked] == IGNORE_INDEX).all()  # the prompt stays masked
            assert (text_labels[masked:] != IGNORE_INDEX).all()  # the answer is trained
            assert (labels[roles == Role.SPECIAL] == IGNORE_INDEX).all()
            checked += 1
    assert checked > 0


def _prompt_answer_examples(tok, n=16):
    s = sample_sentences(2 * n, seed=9, min_words=5, max_words=10)
    out = []
    for q, a in zip(s[:n], s[n:]):
        prompt = tok(f"Question: {q}")["input_ids"]
        answer = tok(f" Answer: {a}", add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def _steps(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


def test_hf_trainer_loss_falls_masks_kept_phase_switches(tmp_path):
    from transformers import TrainingArguments

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    config = GEMConfig(p_raw=0.5, contrastive_from_step=6, alpha=0.5)
    enable_gem(model, tok, config, backend="sdpa")
    collator = RecordingCollator.from_tokenizer(tok, config, packing=False)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=9,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=9,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GEMTrainer(model=model, args=args, train_dataset=_prompt_answer_examples(tok), data_collator=collator)
    scale0 = float(trainer.gem_logit_scale().detach())
    trainer.train()
    steps = _steps(trainer)
    assert [r["gem_phase"] for r in steps] == [1] * 6 + [2] * 3
    assert all("gem_cl_loss" not in r for r in steps[:6]) and all("gem_cl_loss" in r for r in steps[6:])
    assert steps[5]["loss"] < steps[0]["loss"] - 0.3  # phase 1: the (prompt-masked) NTP loss falls
    for r in steps[6:]:  # phase 2: (1 - alpha) * ntp + alpha * cl
        assert r["loss"] == pytest.approx(0.5 * r["gem_ntp_loss"] + 0.5 * r["gem_cl_loss"], rel=1e-3)
    assert steps[-1]["gem_cl_loss"] < steps[6]["gem_cl_loss"]
    assert float(trainer.gem_logit_scale().detach()) != scale0  # the logit scale is trained in phase 2
    assert os.path.isfile(tmp_path / "checkpoint-9" / "gem_logit_scale.pt")
    _assert_prompt_masks_kept(collator)


def test_hf_trainer_full_mode_resume_and_plain_export(tmp_path):
    # The logit scale is a model parameter (the Trainer zeroes and clips it with the model):
    # checkpoints and save_model still write the plain HF model, the scale in its own file, and a
    # resumed run continues to the same weights and scale.
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    def run(out, resume=None):
        tok = make_tiny_tokenizer()
        model = make_tiny_llama(len(tok), seed=4)
        config = GEMConfig(p_raw=0.5, contrastive_from_step=2, alpha=0.5, prefix_dropout=0.2)
        enable_gem(model, tok, config, backend="sdpa")
        args = TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
            save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = GEMTrainer(model=model, args=args, train_dataset=_prompt_answer_examples(tok), data_collator=GEMDataCollator.from_tokenizer(tok, config))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model, tok

    whole, model, tok = run(tmp_path / "a")
    resumed, model_b, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    a, b = model.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.gem_logit_scale.log_scale, resumed.gem_logit_scale.log_scale)
    assert not torch.equal(whole.gem_logit_scale.log_scale.detach(), torch.tensor([math.log(20.0)]))  # it trained
    for folder in (tmp_path / "a" / "checkpoint-2", tmp_path / "a" / "checkpoint-4"):
        assert "gem_logit_scale.log_scale" not in load_file(str(folder / "model.safetensors"))
        assert os.path.isfile(folder / "gem_logit_scale.pt")
    whole.save_model(str(tmp_path / "export"))
    plain = make_tiny_llama(len(tok))
    assert set(load_file(str(tmp_path / "export" / "model.safetensors"))) <= set(plain.state_dict())


def test_trl_sft_trainer_with_gem(tmp_path):
    trl = pytest.importorskip("trl")  # the dev extra; constraints.txt pins it; resolves against transformers 5.24
    from datasets import Dataset

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    config = GEMConfig(p_raw=0.5, contrastive_from_step=4, alpha=0.5)
    enable_gem(model, tok, config, backend="sdpa")
    s = sample_sentences(32, seed=9, min_words=6, max_words=12)
    ds = Dataset.from_dict({"prompt": [f"Question: {a}" for a in s[:16]], "completion": [f" Answer: {b}" for b in s[16:]]})
    collator = RecordingCollator.from_tokenizer(tok, config)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=64,
        seed=0,
    )
    trainer = gem_trainer_class(trl.SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=collator)
    trainer.train()
    steps = _steps(trainer)
    assert [r["gem_phase"] for r in steps] == [1] * 4 + [2] * 2
    assert steps[3]["loss"] < steps[0]["loss"]
    assert all("gem_cl_loss" in r for r in steps[4:])
    # TRL built completion-only labels; the collator kept the prompt masked.
    _assert_prompt_masks_kept(collator)
    assert any(b["roles"].eq(Role.SPECIAL).any() for _, b in collator.seen)


def test_logit_scale_takes_the_dtype_of_a_bf16_model(tmp_path):
    """DeepSpeed's bf16 optimizers (the Trainer's ZeRO-1..3) refuse trainable parameters of
    mixed dtypes: the scale GEMTrainer attaches must be bf16 on a bf16 model (fp32 on fp32)."""
    from transformers import TrainingArguments

    tok = make_tiny_tokenizer()
    for dtype in (torch.bfloat16, torch.float32):
        model = make_tiny_llama(len(tok)).to(dtype)
        config = GEMConfig(num_special_tokens=1)
        enable_gem(model, tok, config)
        collator = GEMDataCollator.from_tokenizer(tok, config, max_length=32)
        args = TrainingArguments(output_dir=str(tmp_path / str(dtype)), report_to=[], use_cpu=True)
        trainer = GEMTrainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2, 3]}], data_collator=collator)
        assert trainer.gem_logit_scale.log_scale.dtype == dtype
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}


def test_gem_trainer_distils_a_teacher(tmp_path, tiny_teacher):
    """GEMTrainer(gem_teacher=...): phase 1 as without a teacher, phase 2's contrastive term is
    the teacher's (through the one micro_batch_loss) on the examples' raw text; the teacher gets
    no gradient and the saved model holds none of its tensors."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from megatron_gem.distill import Teacher

    texts = sample_sentences(16, seed=9, min_words=6, max_words=12)

    def run(out, teacher):
        tok = make_tiny_tokenizer()  # enable_gem adds the GEM token to it
        examples = [{"input_ids": tok(t)["input_ids"], "text": t} for t in texts]
        model = make_tiny_llama(len(tok))
        config = GEMConfig(p_raw=0.5, contrastive_from_step=3, alpha=1.0, teacher_weight=1.0)
        enable_gem(model, tok, config, backend="sdpa")
        collator = GEMDataCollator.from_tokenizer(tok, config)
        args = TrainingArguments(
            output_dir=str(out), max_steps=5, per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = GEMTrainer(model=model, args=args, train_dataset=examples, data_collator=collator, gem_teacher=teacher)
        seen = []
        if trainer.gem_teacher is not None:
            embed = trainer.gem_teacher.embed
            trainer.gem_teacher.embed = lambda t: seen.append(list(t)) or embed(t)
        trainer.train()
        trainer.save_model(str(out / "final"))
        return _steps(trainer), seen, trainer

    plain, _, _ = run(tmp_path / "plain", None)
    distilled, seen, trainer = run(tmp_path / "teacher", tiny_teacher)
    assert isinstance(trainer.gem_teacher, Teacher) and trainer.data_collator.text_field == "text"
    assert [r["gem_phase"] for r in distilled] == [1, 1, 1, 2, 2]
    for a, b in zip(plain[:3], distilled[:3]):  # phase 1: the teacher plays no part
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert all(abs(a["gem_cl_loss"] - b["gem_cl_loss"]) > 1e-4 for a, b in zip(plain[3:], distilled[3:]))
    assert len(seen) == 2 and all(
        len(t) == 16 and t[:8] == t[8:] and set(t[:8]) <= set(texts) for t in seen
    )  # each phase-2 step: its 8 examples' raw text, twice
    assert all(not p.requires_grad and p.grad is None for p in trainer.gem_teacher.parameters())
    saved = load_file(str(tmp_path / "teacher" / "final" / "model.safetensors"))
    assert sorted(saved) == sorted(load_file(str(tmp_path / "plain" / "final" / "model.safetensors")))
