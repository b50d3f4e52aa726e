"""GEMTrainer on the tiny reserved-token base, launched by test_trainer_ddp.py with python (one
process) or torchrun (DDP over gloo): both phases (phase 2 with alpha 0.5, so NTP and InfoNCE
in one step), plain SGD so the updates are the gradients themselves. Rank 0 writes what trained
(the adapter in summary mode, every weight in full mode), the logit scale after each step and
the per-step losses to OUT/MODE/result.pt; every rank writes its own trained tensors to OUT/MODE/rank{r}.pt.

    python trainer_ddp_worker.py BASE OUT MODES PER_DEVICE_BATCH [ZERO_STAGE|none] [resume]     (MODES: summary,full)

ZERO_STAGE: train through the Trainer's DeepSpeed integration at that ZeRO stage (CPU, gloo).
resume: the run also checkpoints at step RESUME_AT, and a second run resumes from there
(OUT/MODE/resumed.pt: what it trained, its losses, the engine checkpoint's module keys).
"""

import contextlib
import glob
import os
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from megatron_gem.gem import GEMConfig
from megatron_gem.integrations import GEMDataCollator, GEMTrainer, enable_gem
from megatron_gem.integrations.hf_trainer import LOGIT_SCALE_ATTR
from megatron_gem.testing import sample_sentences

STEPS = 5  # 3 mixed-NTP steps, then 2 with NTP and InfoNCE
RESUME_AT = 3  # with RESUME: the checkpoint a second run resumes from (the last mixed-NTP step)


def deepspeed_config(stage: int) -> dict:
    # "auto": the Trainer fills in its own batch size, accumulation and clipping (none here).
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
    }


def snapshot(module) -> dict:
    """A copy of ``module``'s state (whole tensors under ZeRO-3, where the gather is collective),
    without the logit scale the GEM trainer attaches to the model under DeepSpeed."""
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params) if partitioned else contextlib.nullcontext():
        return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(LOGIT_SCALE_ATTR + ".")}


class ScaleTrace(TrainerCallback):
    """The logit scale after every optimizer step, and whether a step began with a gradient of
    it left over from the step before (the Trainer zeroes only the model's gradients)."""

    def __init__(self, trainer):
        self.trainer, self.values, self.stale = trainer, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        grad = self.trainer.gem_logit_scale.log_scale.grad
        self.stale.append(grad is not None and bool(grad.abs().sum() > 0))

    def on_step_end(self, args, state, control, **kwargs):
        self.values.append(float(snapshot(self.trainer.gem_logit_scale)["log_scale"]))


def build(base: str, out: str, mode: str, per_device: int, zero_stage: int | None, save_steps: int | None = None):
    """(model, trainer) of one run; ``save_steps``: checkpoints every that many steps."""
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = GEMConfig(train_mode=mode, num_special_tokens=2, adapter_rank=4, adapter_alpha=8.0, contrastive_from_step=3, alpha=0.5, prefix_dropout=0.2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)  # the adapter's lora_A (and full mode's new token rows) come from the global generator
    enable_gem(model, tok, config, backend="sdpa")
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the update is the gradient
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        disable_tqdm=True,
        seed=0,
        deepspeed=deepspeed_config(zero_stage) if zero_stage is not None else None,
    )
    # 24 examples: a whole number of global batches of 8 per epoch, so no rank pads its last batch.
    texts = sample_sentences(24, seed=5, min_words=6, max_words=16)
    collator = GEMDataCollator.from_tokenizer(tok, config, max_length=64)
    trainer = GEMTrainer(
        model=model, args=args, train_dataset=[{"input_ids": tok(t)["input_ids"]} for t in texts], data_collator=collator, processing_class=tok
    )
    return model, trainer, original


def train(base: str, out: str, mode: str, per_device: int, zero_stage: int | None, resume: bool = False) -> None:
    os.makedirs(out, exist_ok=True)
    model, trainer, original = build(base, out, mode, per_device, zero_stage, save_steps=RESUME_AT if resume else None)
    trained = model.gem_adapter if mode == "summary" else model
    rank = trainer.args.process_index
    if rank == 0:
        torch.save(snapshot(trained), os.path.join(out, "initial.pt"))
    scales = ScaleTrace(trainer)
    trainer.add_callback(scales)
    trainer.train()
    state = snapshot(trained)
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    scale = snapshot(trainer.gem_logit_scale)["log_scale"]
    now = snapshot(model)  # every rank: a ZeRO-3 gather is collective
    if rank == 0:
        steps = [r for r in trainer.state.log_history if "loss" in r]
        result = {
            "state": state,
            "logit_scale": scale,
            "scales": scales.values,
            "stale_scale_grad": scales.stale,
            "loss": [r["loss"] for r in steps],
            "ntp": [r.get("gem_ntp_loss") for r in steps],
            "cl": [r.get("gem_cl_loss") for r in steps],
            "world": trainer.args.world_size,
        }
        if mode == "summary":  # the frozen base, bit for bit as loaded
            result["base_unchanged"] = all(torch.equal(now[k], v) for k, v in original.items())
        torch.save(result, os.path.join(out, "result.pt"))
    if resume:
        resume_run(base, out, mode, per_device, zero_stage)


def resume_run(base: str, out: str, mode: str, per_device: int, zero_stage: int | None) -> None:
    """A second run resumed from the first's step-RESUME_AT checkpoint; rank 0 writes what it
    trained, its losses and the checkpoint's module keys to OUT/MODE/resumed.pt."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    folder = os.path.join(out, "run", f"checkpoint-{RESUME_AT}")
    unset_hf_deepspeed_config()  # the model loads as the first run's did, not under zero.Init
    model, trainer, _ = build(base, os.path.join(out, "resumed"), mode, per_device, zero_stage)
    trainer.train(resume_from_checkpoint=folder)
    state = snapshot(model.gem_adapter if mode == "summary" else model)
    scale = snapshot(trainer.gem_logit_scale)["log_scale"]
    if trainer.args.process_index == 0:
        keys = {}
        for path in glob.glob(os.path.join(folder, "global_step*", "*model_states.pt")):
            saved = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own file, written above
            keys[os.path.basename(path)] = sorted(saved["module"]) + sorted(saved.get("frozen_param_fragments") or {})
        steps = [r for r in trainer.state.log_history if "loss" in r]
        torch.save({"state": state, "logit_scale": scale, "loss": [r["loss"] for r in steps], "module_keys": keys}, os.path.join(out, "resumed.pt"))


def main(base: str, out: str, modes: str, per_device: int, zero_stage: int | None = None, resume: bool = False) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for mode in modes.split(","):  # one launch for both modes: a process start costs more than a run
        train(base, os.path.join(out, mode), mode, per_device, zero_stage, resume)
        unset_hf_deepspeed_config()  # the next mode's model loads as this one did, not under zero.Init


if __name__ == "__main__":
    stage = sys.argv[5] if len(sys.argv) > 5 else "none"
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), None if stage == "none" else int(stage), "resume" in sys.argv[6:])
    from tests.launch import exit_worker

    exit_worker()
