"""The DeepSpeed engine (ZeRO-0/1/2/3; GPU with NCCL, CPU with gloo): the hooks run.py
calls. The model is an HF causal LM with the GEM tokens and GEM attention (hf/model.py) plus
the InfoNCE logit scale; one optimizer step is ``accum`` micro-batches, each
``engine.backward`` + ``engine.step`` (DeepSpeed steps the optimizer at the accumulation
boundary); checkpoints are DeepSpeed's own (model, optimizer, scheduler, client state).

A GradCache micro-batch (``--contrastive-micro-batch-size``, training/grad_cache.py) runs one
``engine.backward`` per chunk before its one ``engine.step``: every backward but the
micro-batch's last is marked as no accumulation boundary (DeepSpeed's
set_gradient_accumulation_boundary), so ZeRO accumulates the chunks' gradients and reduces
and steps exactly where the unchunked run does; each backward is still scaled by 1 / accum.
"""

from __future__ import annotations

import torch

from ..common import distributed as D
from ..common.errors import ModelLoadError
from ..gem.losses import Distillation
from ..gem.tokens import pad_vocab_rows
from ..hf.export import export_hf, export_summary_adapter
from ..hf.model import GEMModel, load_causal_lm, param_groups, prepare_gem_lm, zero3_gather
from .checkpoint import load_trainable_only
from .ds_config import load_ds_config, zero_stage
from .grad_cache import cached_backward
from .process_setup import init_deepspeed_distributed
from .run import Engine
from .schedule import build_scheduler
from .step import MicroLoss, StepOutput, contrastive_micro_loss, ntp_loss_scale, ntp_micro_loss
from .validation import EvalParts


def to_device(batch: dict, device) -> dict:
    """Tensors of ``batch`` (and of its GradCache chunks) on ``device``."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return [to_device(c, device) for c in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def build_optimizer(model, job, ds_config):
    """None when the DeepSpeed config has an optimizer section (DeepSpeed builds it, e.g. CPU
    Adam for offload); else fused Adam on GPU, torch AdamW on CPU."""
    if "optimizer" in ds_config:
        return None
    o = job.optimizer
    groups = param_groups(model, o.weight_decay)
    betas = (o.adam_beta1, o.adam_beta2)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=o.lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas)


@torch.no_grad()
def grad_norm_of(module) -> float:
    """L2 norm of all gradients (after DeepSpeed's data-parallel averaging at the boundary)."""
    sq = sum(float(p.grad.float().square().sum()) for p in module.parameters() if p.grad is not None)
    return sq**0.5


@torch.no_grad()
def read_logit_scale(model) -> float:
    param = model.logit_scale.log_scale
    if hasattr(param, "ds_id"):  # ZeRO-3: gather the (possibly partitioned) scalar
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return float(model.logit_scale())
    return float(model.logit_scale())


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def init_distributed(self, job) -> None:
        init_deepspeed_distributed(job.run.distributed_timeout_minutes)
        self.dp_rank, self.dp_size, self.dp_group = D.rank(), D.world_size(), None
        self.device = D.bind_local_device()

    def build(self, job, tokenizer) -> None:
        import deepspeed
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(job.model.path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"--model {job.model.path}: cannot read an HF config ({e})") from e
        self.job, self.tokenizer = job, tokenizer
        self.ds_config = load_ds_config(job.parallel.deepspeed_config, job, hf_config)
        dtype = torch.bfloat16 if job.model.bf16 else torch.float32
        lm, self._zero3_handle = load_causal_lm(job.model.path, dtype=dtype, ds_config=self.ds_config)
        prepare_gem_lm(
            lm, tokenizer, job.gem, backend=job.model.attention_backend, gradient_checkpointing=job.model.gradient_checkpointing, gather=zero3_gather(lm)
        )
        if job.gem.summary_mode and not job.gem.base_model:
            job.gem.base_model = job.model.path  # what the adapter export is applied to
        # Full mode trains on rows padded to a multiple of 64 (masked; the export drops them).
        vocab = None if job.gem.summary_mode else pad_vocab_rows(lm, gather=zero3_gather(lm))
        model = GEMModel(lm, job.gem, fast_summary=job.model.summary_fast_path, vocab_size=vocab)
        if job.model.bf16:
            # DeepSpeed's bf16 optimizers (ZeRO-1..3) flatten every trainable parameter into one
            # low-precision buffer and keep the fp32 master copy themselves: a parameter of
            # another dtype (the logit scale is created in fp32) fails their dtype assertion.
            model.logit_scale.to(torch.bfloat16)
        optimizer = build_optimizer(model, job, self.ds_config)
        if optimizer is None:
            engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, job.optimizer.weight_decay), config=self.ds_config)
            engine.lr_scheduler = build_scheduler(optimizer, job)  # so DeepSpeed steps and checkpoints it
        else:
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, job), config=self.ds_config
            )
        self.engine, self.optimizer = engine, optimizer
        self.gather_keys = D.make_gather_keys()
        self.distill = Distillation.from_config(job.gem)  # used where a batch carries the teacher's rows
        # DeepSpeed's plain fp32 engine clips but does not keep the norm; compute it ourselves there.
        self._own_grad_norm = zero_stage(self.ds_config) == 0 and not job.model.bf16
        engine.train()

    def describe(self) -> str:
        return f"ZeRO-{zero_stage(self.ds_config)}, dp={self.dp_size}"

    def train_step(self, step, *, w_ntp, w_cl, ntp_batches, cl_batches, global_tokens) -> StepOutput:
        engine, accum = self.engine, max(len(ntp_batches), len(cl_batches))
        ntp_batches = [to_device(b, self.device) for b in ntp_batches]
        cl_batches = [to_device(b, self.device) for b in cl_batches]
        scale = ntp_loss_scale(w_ntp, dp_size=self.dp_size, accum_steps=accum, global_tokens=global_tokens)
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
        parts: list[MicroLoss] = []
        own_norm = None
        for m in range(accum):
            if cl_batches and "chunks" in cl_batches[m]:
                self._cached_micro_batch(cl_batches[m], ntp_batches[m] if ntp_batches else None, scale, w_cl, parts)
            else:
                loss = torch.zeros((), device=self.device)
                if ntp_batches:
                    part = ntp_micro_loss(engine, ntp_batches[m], scale=scale)
                    parts.append(part)
                    loss = loss + part.loss
                if cl_batches:
                    part = contrastive_micro_loss(engine, cl_batches[m], gather_keys=self.gather_keys, weight=w_cl, distill=self.distill)
                    parts.append(part)
                    loss = loss + part.loss
                engine.backward(loss)
            if m == accum - 1 and self._own_grad_norm:
                own_norm = grad_norm_of(engine.module)
            engine.step()
        grad_norm = own_norm if self._own_grad_norm else engine.get_global_grad_norm()
        ntp_sums = [p.ntp_sum for p in parts if p.cl_loss is None]
        cl_values = [p.cl_loss for p in parts if p.cl_loss is not None]
        return StepOutput(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            reporter=True,
            ntp_sums=ntp_sums,
            cl_values=cl_values,
            tokens=sum(p.tokens for p in parts),
            logit_scale=read_logit_scale(engine.module),
            local_losses=ntp_sums + cl_values,
        )

    def _cached_micro_batch(self, cl_batch: dict, ntp_batch: dict | None, ntp_scale: float, w_cl: float, parts: list) -> None:
        """One GradCache micro-batch (its NTP rows, if any, ride with the first chunk)."""
        engine = self.engine

        def ntp_loss():
            part = ntp_micro_loss(engine, ntp_batch, scale=ntp_scale)
            parts.append(part)
            return part.loss

        def backward(loss, last: bool) -> None:
            if not last:
                engine.set_gradient_accumulation_boundary(False)
            engine.backward(loss)
            if not last:
                engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own count

        value = cached_backward(
            lambda chunk: engine(chunk, "embed"),
            backward,
            cl_batch,
            weight=w_cl,
            gather_keys=self.gather_keys,
            extra=ntp_loss if ntp_batch else None,
            distill=self.distill,
        )
        parts.append(MicroLoss(loss=None, cl_loss=value, tokens=sum(int((c["doc_ids"] >= 0).sum()) for c in cl_batch["chunks"])))

    @torch.no_grad()
    def eval_step(self, ntp_batches, cl_batches):
        engine, parts = self.engine, []
        engine.eval()
        try:
            for ntp, cl in zip(ntp_batches, cl_batches):
                ntp, cl = to_device(ntp, self.device), to_device(cl, self.device)
                losses = engine(ntp, "ntp_losses")  # per-token, without full logits
                emb, scale = engine(cl, "embed")
                n = int(cl["num_texts"])
                parts.append(EvalParts(token_losses=losses, anchors=emb[:n], positives=emb[n : 2 * n], logit_scale=float(scale)))
        finally:
            engine.train()
        return parts, True

    def save(self, save_dir, tag, state) -> None:
        engine = self.engine
        try:
            # Summary mode: the frozen base is --model itself, unchanged; the checkpoint holds only
            # what trains (adapter, logit scale, their optimizer states).
            engine.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False, exclude_frozen_parameters=self.job.gem.summary_mode)
        except OSError:
            # The other ranks are finishing DeepSpeed's save_checkpoint, whose collectives after
            # the writes are ZeRO-3's checkpoint_event_epilogue (re-gathering persistent
            # parameters) and a final barrier. Take part in the same ones, then let the trainer
            # agree on the error instead of leaving them hanging until the collective timeout.
            if getattr(engine, "optimizer", None) is not None and hasattr(engine.optimizer, "checkpoint_event_epilogue"):
                engine.optimizer.checkpoint_event_epilogue()
            D.barrier()
            raise

    def load(self, load_dir, tag) -> dict:
        from ..common.manifest import CheckpointError

        custom = load_trainable_only if self.job.gem.summary_mode else None
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, custom_load_fn=custom)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
        return client_state

    def export_hf(self, out_dir, extra) -> None:
        module = self.engine.module
        if self.job.gem.summary_mode:
            export_summary_adapter(
                module.lm,
                module.adapter,
                self.tokenizer,
                self.job.gem,
                out_dir,
                extra,
                base_path=self.job.model.path,
                self_contained=self.job.checkpoint.hf_export_self_contained,
            )
        else:
            export_hf(module.lm, self.tokenizer, self.job.gem, out_dir, extra=extra, vocab_size=module.vocab_size)

    def report(self) -> dict:
        return {"zero_stage": zero_stage(self.ds_config), "dp_size": self.dp_size}

    def close(self) -> None:
        self._zero3_handle = None
