"""Summary mode (GEMConfig(train_mode="summary")) through enable_gem, GEMDataCollator and
GEMTrainer: the base is never written, plain text is the base model bit for bit, only the adapter
(+ logit scale) is optimised, save_model writes the adapter folder that GEMEmbedder loads, and a
resume continues to the same adapter."""

import os

import numpy as np
import pytest
import torch

from megatron_gem.embedder import GEMEmbedder
from megatron_gem.gem import IGNORE_INDEX, GEMConfig, Role, next_token_labels
from megatron_gem.integrations import GEMDataCollator, GEMTrainer, disable_gem, enable_gem, is_gem_enabled
from megatron_gem.testing import RESERVED_TOKENS, sample_sentences, save_tiny_reserved_base

TEXTS = sample_sentences(4, seed=11) + ["x"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_reserved_base(tmp_path_factory.mktemp("integ_summary") / "base", seed=3)


def _load(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(base_dir)


def _config(**kw):
    cfg = dict(train_mode="summary", num_special_tokens=2, adapter_rank=4, adapter_alpha=8.0, contrastive_from_step=3, alpha=0.5)
    cfg.update(kw)
    return GEMConfig(**cfg)


def _dataset(tok, n=24):
    texts = sample_sentences(n, seed=5, min_words=6, max_words=16) + ["Hi.", "A cat."]  # the last two: too short for split
    return [{"input_ids": tok(t)["input_ids"]} for t in texts]


def _trainer(model, tok, config, out, *, max_steps, save_steps, seed=0, **extra):
    from transformers import TrainingArguments

    args = TrainingArguments(
        **extra,
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    collator = GEMDataCollator.from_tokenizer(tok, config, max_length=64)
    return GEMTrainer(model=model, args=args, train_dataset=_dataset(tok), data_collator=collator, processing_class=tok)


def test_enable_gem_summary_mode_adds_nothing_and_freezes_the_base(base_dir):
    model, tok = _load(base_dir)
    vocab, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config()
    assert enable_gem(model, tok, config, backend="sdpa") is model and is_gem_enabled(model)
    assert len(tok) == vocab and model.get_input_embeddings().weight.shape[0] == rows  # nothing added or resized
    assert config.special_token_ids == tok.convert_tokens_to_ids(list(RESERVED_TOKENS))
    assert config.base_model == os.path.abspath(base_dir)
    assert not getattr(model.generation_config, "suppress_tokens", None)  # generation stays the base's
    adapter = model.gem_adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"gem_adapter.{n}" for n, _ in adapter.named_parameters()} and trainable
    assert enable_gem(model, tok, config, backend="sdpa").gem_adapter is adapter  # idempotent
    # state_dict carries the adapter (what a Trainer/DeepSpeed checkpoint of the module needs);
    # save_pretrained writes the base alone, unchanged.
    assert set(model.state_dict()) == set(before) | {f"gem_adapter.{k}" for k in adapter.state_dict()}
    disable_gem(model)
    assert not hasattr(model, "gem_adapter") and not adapter.hook_handles and not is_gem_enabled(model)
    assert all(p.requires_grad for p in model.parameters())  # as before enable_gem
    assert set(model.state_dict()) == set(before)


def test_enable_gem_summary_mode_needs_a_base_checkpoint(tiny_tokenizer):
    from megatron_gem.testing import make_tiny_llama

    tok = tiny_tokenizer
    with pytest.raises(ValueError, match="base_path"):
        enable_gem(make_tiny_llama(len(tok)), tok, GEMConfig(train_mode="summary", summary_tokens=["<unk>"]), backend="sdpa")


def test_collator_summary_mode_drops_plain_and_prefix_targets(base_dir):
    from megatron_gem.gem.tokens import summary_token_ids

    _, tok = _load(base_dir)
    collators = {}
    for layout in ("split", "reconstruct"):
        config = _config(layout=layout)
        summary_token_ids(tok, config)
        collator = collators[layout] = GEMDataCollator.from_tokenizer(tok, config, max_length=40, packing=True)
        examples = _dataset(tok)
        batch = collator(examples)
        assert collator.stats["plain"] == 0 and collator.stats["reconstruct_too_long"] == 0
        dropped = collator.stats["too_short_for_summary_layout"]
        assert dropped == (2 if layout == "split" else 0)
        docs, roles = batch["doc_ids"], batch["roles"]
        assert int(docs.max()) + 1 == len(examples) - dropped  # every kept example is one document
        for d in range(len(examples) - dropped):
            assert ((docs == d) & (roles == Role.SPECIAL)).sum() == 2  # every document has the GEM layout
        # After HF's shift the labels are train.py's summary-mode labels (no prediction made at a
        # PREFIX position; gem.layout.next_token_labels with prefix_targets=False).
        want = next_token_labels(batch["input_ids"], roles, docs, prefix_targets=False)
        assert torch.equal(batch["labels"][:, 1:], want[:, :-1]) and (want[:, -1] == IGNORE_INDEX).all()
        assert (batch["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="too short"):
        collators["split"]([{"input_ids": tok("Hi.")["input_ids"]}])


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.gem_adapter.state_dict().items()}


def test_trainer_summary_mode_base_exact_optimizer_export(base_dir, tmp_path):
    model, tok = _load(base_dir)
    reference, _ = _load(base_dir)  # untouched
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config()
    enable_gem(model, tok, config, backend="sdpa")
    fresh = _adapter_state(model)
    trainer = _trainer(model, tok, config, tmp_path / "run", max_steps=5, save_steps=5)
    trainer.train()
    steps = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["gem_phase"] for r in steps] == [1, 1, 1, 2, 2] and all("gem_cl_loss" in r for r in steps[3:])
    assert trainer.data_collator.stats["too_short_for_summary_layout"] > 0
    # (c) the optimizer holds exactly the adapter and the logit scale
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.gem_adapter.parameters()} | {id(trainer.gem_logit_scale.log_scale)}
    # the adapter trained; (a) every base parameter is as loaded
    assert any(not torch.equal(v, fresh[k]) for k, v in _adapter_state(model).items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    # (b) plain text (and greedy generation) is the untouched base model's, bit for bit
    model.eval()
    ids = torch.tensor([tok("The cat runs under the old tree.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, reference(input_ids=ids, use_cache=False).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(model.generate(ids, **kw), reference.generate(ids, **kw))
    # (d) save_model writes the adapter folder (not the base weights), which GEMEmbedder loads
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert os.path.isfile(out / "adapter_model.safetensors") and not os.path.exists(out / "model.safetensors")
    live = GEMEmbedder(model, tok, config, adapter=model.gem_adapter, backend="sdpa").encode(TEXTS)
    for folder, base in ((out, None), (out, base_dir), (tmp_path / "run" / "checkpoint-5", None)):
        loaded = GEMEmbedder.from_pretrained(str(folder), base=base, backend="sdpa")
        assert loaded.base_path == (base or os.path.abspath(base_dir))
        assert torch.equal(loaded.encode(TEXTS), live)
    # save_model into the output dir keeps the checkpoints there
    trainer.save_model()
    assert os.path.isdir(tmp_path / "run" / "checkpoint-5") and GEMEmbedder.from_pretrained(str(tmp_path / "run"), backend="sdpa").encode(TEXTS).equal(live)
    # model.save_pretrained writes the base, unchanged
    model.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "plain" / "model.safetensors"))) == set(reference.state_dict())


def test_trainer_summary_mode_resume_gives_the_same_adapter(base_dir, tmp_path):
    # Random split cuts and prefix dropout: the resumed run must continue the collator's draws
    # (GEMTrainer sets its counter from the checkpoint's global step) to see the same batches.
    config_kw = dict(layout="split", prefix_dropout=0.2)
    model, tok = _load(base_dir)
    config = _config(**config_kw)
    enable_gem(model, tok, config, backend="sdpa")
    whole = _trainer(model, tok, config, tmp_path / "a", max_steps=5, save_steps=2)
    whole.train()
    model_b, tok_b = _load(base_dir)
    config_b = _config(**config_kw)
    enable_gem(model_b, tok_b, config_b, backend="sdpa")
    resumed = _trainer(model_b, tok_b, config_b, tmp_path / "b", max_steps=5, save_steps=100)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = _adapter_state(model), _adapter_state(model_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.gem_logit_scale.log_scale.detach(), resumed.gem_logit_scale.log_scale.detach())
    assert np.isfinite([r["loss"] for r in resumed.state.log_history if "loss" in r]).all()


def test_trainer_summary_mode_under_gradient_checkpointing_trains_the_same(base_dir, tmp_path):
    # Phase 2 with alpha < 1: one step runs the NTP and the contrastive forward before one
    # backward, so each recomputed layer must see its own forward's summary rows.
    out = {}
    for ckpt in (False, True):
        model, tok = _load(base_dir)
        config = _config(contrastive_from_step=1)
        torch.manual_seed(0)  # lora_A's initial values come from the global generator
        enable_gem(model, tok, config, backend="sdpa")
        _trainer(model, tok, config, tmp_path / str(ckpt), max_steps=3, save_steps=100, gradient_checkpointing=ckpt).train()
        assert model.model.gradient_checkpointing == ckpt
        out[ckpt] = _adapter_state(model)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in out[True].items() if "lora_B" in k)
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[False])


def test_trainer_refuses_a_trainable_base_or_a_mismatched_mode(base_dir, tmp_path):
    model, tok = _load(base_dir)
    config = _config()
    enable_gem(model, tok, config, backend="sdpa")
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base parameters require grad: \\['lm_head.weight'\\]"):
        _trainer(model, tok, config, tmp_path / "a", max_steps=1, save_steps=100)
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="carries a summary adapter"):
        GEMTrainer(
            model=model,
            args=_trainer(model, tok, config, tmp_path / "b", max_steps=1, save_steps=100).args,
            data_collator=GEMDataCollator.from_tokenizer(tok, config),
            gem_config=GEMConfig(special_token_ids=config.special_token_ids[:1]),
        )
