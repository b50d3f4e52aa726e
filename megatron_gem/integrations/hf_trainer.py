"""GEM's two phases inside an HF ``Trainer`` (or any subclass, e.g. TRL's ``SFTTrainer``).

Phase 1 (steps < ``config.contrastive_from_step``) needs nothing special: the collator's
labels make the model's own (or TRL's) next-token loss the GEM mixed-NTP loss. From that step
on, :class:`GEMTrainerMixin` adds InfoNCE over the summary embeddings of the collator's
contrastive view: ``loss = (1 - alpha) * ntp + alpha * info_nce`` (``gem.losses.loss_weights``).

    trainer = GEMTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, gem_config=cfg)
    GEMSFTTrainer = gem_trainer_class(trl.SFTTrainer)      # the same for any Trainer subclass

The learnable logit scale (``gem.losses.LogitScale``, ``trainer.gem_logit_scale``) is attached
to the model as ``model.gem_logit_scale`` and left out of ``save_pretrained`` (the exported
checkpoint stays a plain HF model): the Trainer zeroes and clips its gradient with the model's,
it takes no weight decay, DDP leaves it alone and the trainer averages its gradient over the
data-parallel ranks (DeepSpeed, whose ZeRO optimizers take only the module's parameters, does
that itself), and it is saved as ``gem_logit_scale.pt`` in every Trainer checkpoint and
restored on resume. The contrastive
negatives are gathered from every data-parallel rank (``common.distributed.make_gather_keys``).
The embeddings come from the model's own forward (``output_hidden_states``), so DDP / DeepSpeed
see one ordinary forward per loss term. Logged: ``gem_phase``, ``gem_ntp_loss``,
``gem_cl_loss``, ``gem_logit_scale`` (means over the logging window and the data-parallel
ranks: the global batch's values, as the Trainer's ``loss``). Under DDP the run equals one
process with the same global batch (tests/integrations/test_trainer_ddp.py; the collator draws
by global example index).

Summary mode (``gem_config.train_mode == "summary"``; ``enable_gem`` attached ``model.gem_adapter``):
the optimizer holds the adapter's parameters and the logit scale, nothing of the base (checked at
construction); ``save_model()`` and every checkpoint write the adapter folder
(integrations.save_gem_adapter: PEFT aLoRA files, gem_config, tokenizer, manifest), never a copy
of the base weights; resuming loads the folder's deltas back into the adapter (aLoRA guard and
base digest checked). Under DeepSpeed the engine's resume checkpoint leaves the frozen base out
too (``exclude_frozen_parameters``) and is loaded back with training.checkpoint.load_trainable_only.
Phase 1 is the collator's (GEM layouts only, no prefix targets); phase 2 runs the full-row
forward through the model (not hf/summary.py's cached fast path, which would bypass a DDP
wrapper's forward).

Teacher distillation (``gem_teacher=``: a :class:`~megatron_gem.distill.Teacher` or a
sentence-transformers folder): phase 2's contrastive term becomes train.py's
(``gem.losses.contrastive_loss``: the teacher's KL, mixed with InfoNCE by
``gem_config.teacher_weight``); the teacher embeds each example's raw text (field
``gem_teacher_text_field``, default "text", kept by the Trainer's column removal; the collator
carries it as ``gem_cl_texts``), and stays a plain object of the trainer (never in the model, the
optimizer or a save).

:class:`GEMPhaseCallback` reports the phase switch for pipelines that keep their own Trainer.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os

import torch
from transformers import Trainer, TrainerCallback

from ..common import distributed as D
from ..distill.teacher_rows import embed_batch
from ..gem.config import GEMConfig
from ..gem.losses import Distillation, LogitScale, loss_weights, micro_batch_loss
from ..gem.readout import pool_special_states
from .collator import CL_KEYS, CL_PREFIX, GEMDataCollator
from .enable import is_gem_enabled
from .gem_adapter import gem_adapter_of, load_gem_adapter, save_gem_adapter

logger = logging.getLogger(__name__)
LOGIT_SCALE_FILE = "gem_logit_scale.pt"
LOGIT_SCALE_ATTR = "gem_logit_scale"  # the scale's name on the model (_attach_logit_scale)


def _gathered(param):
    """The whole of ``param`` inside the block (ZeRO-3 partitions it), read-only."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def gem_phase(step: int, config: GEMConfig) -> int:
    """1 (mixed NTP) before ``config.contrastive_from_step``, 2 (contrastive) from it on."""
    return 1 if loss_weights(step, config)[1] == 0.0 else 2


class GEMPhaseCallback(TrainerCallback):
    """Tracks the GEM phase of the step about to run (``self.phase``), logs the switch once,
    and adds ``gem_phase`` to every log record."""

    def __init__(self, config: GEMConfig):
        self.config = config
        self.phase = 1
        self.switched_at: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        phase = gem_phase(state.global_step, self.config)
        if phase == 2 and self.phase == 1:
            self.switched_at = state.global_step
            logger.info("GEM: contrastive phase from step %d on", state.global_step)
        self.phase = phase

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.setdefault("gem_phase", self.phase)


class GEMTrainerMixin:
    """Put before a Trainer class in the bases; takes ``gem_config=`` (default: the model's
    ``gem_config`` set by enable_gem)."""

    def __init__(self, *args, gem_config: GEMConfig | None = None, gem_teacher=None, gem_teacher_text_field: str = "text", **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        config = gem_config or getattr(model, "gem_config", None)
        if config is None:
            raise ValueError("GEM trainer: pass gem_config= or call enable_gem(model, tokenizer, config) first")
        if not is_gem_enabled(model):
            raise ValueError("GEM trainer: the model does not run the GEM attention; call enable_gem(model, tokenizer, config)")
        self.gem_config = config
        if config.summary_mode:
            _check_only_adapter_trains(model)
        elif gem_adapter_of(model) is not None:
            raise ValueError("GEM trainer: the model carries a summary adapter (enable_gem with train_mode='summary') but gem_config.train_mode is 'full'")
        collator = self.data_collator
        if not isinstance(collator, GEMDataCollator):
            raise TypeError(f"GEM trainer needs a GEMDataCollator as data_collator, got {type(collator).__name__}")
        if config.alpha > 0:
            collator.contrastive = True  # set before any DataLoader (and its workers) exists
        first = next(model.parameters())
        # Teacher distillation (#28): a distill.Teacher or a sentence-transformers folder. A plain
        # object of the trainer, never an attribute of the model (no optimizer, DDP, ZeRO, save).
        self.gem_teacher = None
        if gem_teacher is not None:
            from ..distill import Teacher

            self.gem_teacher = gem_teacher if isinstance(gem_teacher, Teacher) else Teacher.from_pretrained(str(gem_teacher), device=first.device)
            collator.text_field = gem_teacher_text_field
        # The dtype of the model's own parameters: DeepSpeed's bf16/fp16 optimizers (ZeRO-1..3)
        # flatten every trainable parameter into one low-precision buffer (keeping the fp32
        # master themselves) and refuse a parameter of another dtype.
        self.gem_logit_scale = LogitScale.from_config(config).to(first.device, dtype=first.dtype)
        _attach_logit_scale(model, self.gem_logit_scale)
        self._gem_gather = D.make_gather_keys()
        self._gem_logs: dict[str, list[float]] = {}
        self.add_callback(GEMPhaseCallback(config))

    def _set_signature_columns_if_needed(self):
        # The Trainer keeps only the columns the model's forward takes (remove_unused_columns);
        # the teacher's raw text must reach the collator too.
        super()._set_signature_columns_if_needed()
        field = getattr(self.data_collator, "text_field", None)
        if getattr(self, "gem_teacher", None) is not None and field and self._signature_columns is not None and field not in self._signature_columns:
            self._signature_columns.append(field)

    # -------------------------------------------------------------------- optimizer
    def get_decay_parameter_names(self, model) -> list[str]:
        # The logit scale is a model parameter (_attach_logit_scale); like a bias it takes no decay.
        return [n for n in super().get_decay_parameter_names(model) if not n.startswith(LOGIT_SCALE_ATTR + ".")]

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        param = self.gem_logit_scale.log_scale
        if not any(param is p for g in optimizer.param_groups for p in g["params"]):
            group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            group.update(params=[param], weight_decay=0.0)
            optimizer.add_param_group(group)
        return optimizer

    # -------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cl_batch = {k[len(CL_PREFIX) :]: inputs.pop(k) for k in CL_KEYS if k in inputs}
        w_ntp, w_cl = loss_weights(self.state.global_step, self.gem_config)
        if w_cl == 0.0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not cl_batch:
            raise ValueError("contrastive phase without the collator's contrastive view (GEMDataCollator.contrastive is off)")
        outputs = ntp = None
        if w_ntp > 0:
            ntp = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if return_outputs:
                ntp, outputs = ntp
            self._gem_record("gem_ntp_loss", ntp)
        # The Trainer leaves accumulation to a token-normalised NTP loss when it skips its own
        # division by the steps; the InfoNCE mean must then be divided here.
        steps = self.current_gradient_accumulation_steps if self._gem_trainer_skips_ga_division(num_items_in_batch) else 1
        emb, head_out = self.gem_contrastive_embeddings(model, cl_batch)
        teacher = None
        if self.gem_teacher is not None:  # its rows of the same texts, no gradient (distill/teacher_rows.py)
            teacher = embed_batch(self.gem_teacher, {"texts": cl_batch.get("texts"), "num_texts": cl_batch["num_texts"]})["teacher"]
        part = micro_batch_loss(
            w_ntp=w_ntp,
            ntp=ntp,
            w_cl=w_cl / steps,
            embeddings=emb,
            logit_scale=self.gem_logit_scale(),
            num_texts=int(cl_batch["num_texts"]),
            gather_keys=self._gem_gather,
            teacher=teacher,
            distill=Distillation.from_config(self.gem_config),
            touch=(head_out,),  # the LM head ran on one position: in the graph, so DDP sees it used
        )
        self._gem_record("gem_cl_loss", part.cl)
        self._gem_record("gem_logit_scale", self.gem_logit_scale())
        return (part.total, outputs) if return_outputs else part.total

    def _gem_trainer_skips_ga_division(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step's rule for when it divides the loss by the steps.
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        accepts = getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        return bool(accepts or getattr(self, "compute_loss_func", None) is not None)

    def gem_contrastive_embeddings(self, model, cl_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summary embeddings [2N, H] of the texts (doc j) and their dropout views (doc N + j),
        the LM head's output on the one position the forward keeps). Through the model's own
        forward, so DDP / DeepSpeed see an ordinary forward."""
        n = int(cl_batch["num_texts"])
        out = model(
            input_ids=cl_batch["input_ids"],
            position_ids=cl_batch["position_ids"],
            doc_ids=cl_batch["doc_ids"],
            roles=cl_batch["roles"],
            output_hidden_states=True,
            logits_to_keep=1,  # no full-vocabulary logits for the contrastive rows
            use_cache=False,
        )
        return pool_special_states(out.hidden_states[-1], cl_batch["roles"], cl_batch["doc_ids"], 2 * n), out.logits

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        grad = self.gem_logit_scale.log_scale.grad
        if grad is not None and not self.is_deepspeed_enabled and D.world_size() > 1:
            # Averaging is linear, so doing it after every accumulation micro-step is exact.
            grad.copy_(D.all_reduce_sum(grad) / D.world_size())
        return loss

    # -------------------------------------------------------------------- logging
    def _gem_record(self, key: str, value: torch.Tensor) -> None:
        self._gem_logs.setdefault(key, []).append(float(value.detach()))

    def log(self, logs: dict, *args, **kwargs):
        keys = sorted(k for k, v in self._gem_logs.items() if v)
        means = torch.tensor([sum(self._gem_logs[k]) / len(self._gem_logs[k]) for k in keys], dtype=torch.float64, device=self.args.device)
        if keys and D.world_size() > 1:
            # Every rank logs (the Trainer's own loss is gathered here too) with the same keys:
            # the mean over ranks is the global batch's value, as the Trainer's "loss" is (the
            # NTP term a rank returns is its share of the global token mean times the ranks).
            means = D.all_reduce_sum(means) / D.world_size()
        logs.update({k: float(v) for k, v in zip(keys, means)})
        self._gem_logs = {}
        logs.setdefault("gem_phase", gem_phase(max(self.state.global_step - 1, 0), self.gem_config))
        return super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------- checkpoints
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None  # None: the Trainer says so
        if checkpoint is not None:
            # Here, not in _load_from_checkpoint: the Trainer calls that one only without DeepSpeed
            # (the engine loads its own checkpoint), and the draws must resume under every engine.
            self._gem_resume_collator(checkpoint)
        with self._gem_deepspeed_summary_resume():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        if not self.gem_config.summary_mode:
            return super().save_model(output_dir, _internal_call=_internal_call)
        # Summary mode writes the adapter folder on every engine. The Trainer's DeepSpeed branch
        # would first consolidate the whole model (under ZeRO-3 a gather of the frozen base onto
        # rank 0) only for _save to drop it; save_gem_adapter gathers just the adapter, and every
        # rank calls it (collective under ZeRO-3).
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not (self.is_deepspeed_enabled and self.gem_config.summary_mode):
            return super()._save_optimizer_and_scheduler(output_dir)
        # The engine's resume checkpoint without the frozen base (it is the untouched base
        # checkpoint the run loaded): the adapter, the logit scale and their optimizer state, as
        # train.py's DeepSpeed engine writes it. The Trainer passes exclude_frozen_parameters only
        # for PEFT models, so hand it a save_checkpoint that does.
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine, exclude_frozen_parameters=True)
        try:
            return super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint  # back to the class's method

    @contextlib.contextmanager
    def _gem_deepspeed_summary_resume(self):
        """Under DeepSpeed in summary mode, the Trainer's resume loads the engine checkpoint with
        training.checkpoint.load_trainable_only (the frozen base is not in it: see
        _save_optimizer_and_scheduler) instead of a strict load, which would refuse it, or a
        non-strict one, which would not notice a missing adapter tensor. The Trainer calls the
        module global transformers.trainer.deepspeed_load_checkpoint; it is swapped for this
        train() call only."""
        import transformers.trainer as hf_trainer

        original = getattr(hf_trainer, "deepspeed_load_checkpoint", None)
        if not (self.is_deepspeed_enabled and self.gem_config.summary_mode) or original is None:
            yield
            return

        def load(engine, checkpoint_path, load_module_strict=True):
            from ..training.checkpoint import load_trainable_only

            if not glob.glob(os.path.join(checkpoint_path, "global_step*")):
                return original(engine, checkpoint_path, load_module_strict=load_module_strict)  # its own error
            path, _ = engine.load_checkpoint(checkpoint_path, load_optimizer_states=True, load_lr_scheduler_states=True, custom_load_fn=load_trainable_only)
            if path is None:
                raise ValueError(f"GEM trainer: DeepSpeed could not resume from {checkpoint_path}")

        hf_trainer.deepspeed_load_checkpoint = load
        try:
            yield
        finally:
            hf_trainer.deepspeed_load_checkpoint = original

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        with _gathered(self.gem_logit_scale.log_scale):  # every rank: the gather is collective
            if self.args.should_save:
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                if os.path.isdir(folder):
                    torch.save({k: v.detach().clone() for k, v in self.gem_logit_scale.state_dict().items()}, os.path.join(folder, LOGIT_SCALE_FILE))

    def _save(self, output_dir=None, state_dict=None):
        if not self.gem_config.summary_mode:
            return super()._save(output_dir, state_dict=state_dict)
        # The adapter folder (gathered by the export itself under ZeRO-3; the engine's
        # consolidated ``state_dict`` would hold the frozen base too), then the Trainer's own
        # training_args.bin as its _save writes it.
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tokenizer = self.processing_class if hasattr(self.processing_class, "get_vocab") else None
        save_gem_adapter(self.model, output_dir, tokenizer=tokenizer, extra={"global_step": self.state.global_step})
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_best_model(self, *args, **kwargs):
        if not self.gem_config.summary_mode:
            return super()._load_best_model(*args, **kwargs)
        load_gem_adapter(self.model, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, *args, **kwargs):
        if self.gem_config.summary_mode:
            load_gem_adapter(args[0] if args and args[0] is not None else self.model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        path = os.path.join(resume_from_checkpoint, LOGIT_SCALE_FILE)
        if os.path.isfile(path):
            self.gem_logit_scale.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _gem_resume_collator(self, checkpoint: str) -> None:
        # The Trainer skips the batches a resumed run already trained on without collating them
        # (accelerate's SkipBatchSampler); the collator's draw counter must continue from there
        # too, or the resumed steps get other layouts than the uninterrupted run's. Without
        # DataLoader workers the main process's collator draws every batch: global_step x accum
        # training batches came before (evaluation batches drawn by the same collator are not
        # counted; see docs/integrations.md).
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState

        path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if self.args.dataloader_num_workers == 0 and not self.args.ignore_data_skip and os.path.isfile(path):
            self.data_collator.resume_at(TrainerState.load_from_json(path).global_step * self.args.gradient_accumulation_steps)


def _attach_logit_scale(model, scale: LogitScale) -> None:
    """The logit scale as ``model.gem_logit_scale``: the Trainer zeroes (``model.zero_grad``)
    and clips the model's gradients, and DeepSpeed's ZeRO optimizers (every stage) take only
    parameters of the module they wrap. Left out of ``save_pretrained`` (the export stays the
    HF model; checkpoints carry it as LOGIT_SCALE_FILE). DDP ignores it (no forward of the model
    uses it; training_step averages its gradient); DeepSpeed reduces (under ZeRO-3 partitions) it."""
    name = f"{LOGIT_SCALE_ATTR}.log_scale"
    model.add_module(LOGIT_SCALE_ATTR, scale)
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | {name}
    model._ddp_params_and_buffers_to_ignore = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", None) or ()) | {name})


def _check_only_adapter_trains(model) -> None:
    """Summary mode: the adapter is attached and no base parameter requires grad (the Trainer's
    optimizer takes every parameter that does)."""
    adapter = gem_adapter_of(model)
    if adapter is None:
        raise ValueError("GEM trainer: train_mode='summary' but the model has no summary adapter; call enable_gem(model, tokenizer, config) with that config")
    own = {id(p) for p in adapter.parameters()}
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own and not n.startswith(LOGIT_SCALE_ATTR + ".")]
    if loose:
        raise ValueError(f"GEM trainer: summary mode trains only the adapter, but base parameters require grad: {loose[:3]}{' ...' if len(loose) > 3 else ''}")


def gem_trainer_class(base: type = Trainer) -> type:
    """``base`` (a Trainer class) with GEM's contrastive phase: ``gem_trainer_class(SFTTrainer)``."""
    return type(f"GEM{base.__name__}", (GEMTrainerMixin, base), {})


GEMTrainer = gem_trainer_class(Trainer)
