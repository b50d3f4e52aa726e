"""The DeepSpeed engine (ZeRO-0/1/2/3; GPU with NCCL, CPU with gloo): the hooks run.py
calls. The model is an HF causal LM with the GEM tokens and GEM attention (hf/model.py) plus
the InfoNCE logit scale; one optimizer step is ``accum`` micro-batches, each
``engine.backward`` + ``engine.step`` (DeepSpeed steps the optimizer at the accumulation
boundary); checkpoints are DeepSpeed's own (model, optimizer, scheduler, client state).

The step's passes are training/step_plan.py's (``DeepSpeedPasses`` says how this engine runs
one): a unit's NTP rows and texts are two forwards of the HF model (summary mode's fast path
runs inside the "embed" forward: hf/summary.py summary_states), one ``engine.backward`` per
unit. A GradCache micro-batch (``--contrastive-micro-batch-size``, training/grad_cache.py)
runs one ``engine.backward`` per chunk before its one ``engine.step``: every backward but the
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
from .process_setup import init_deepspeed_distributed
from .run import Engine
from .schedule import build_scheduler
from .step import StepOutput, contrastive_micro_loss, ntp_loss_scale, ntp_micro_loss
from .step_plan import StepPlan, Unit, run_step, step_output
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


class DeepSpeedPasses:
    """How DeepSpeed runs the passes of a step (training/step_plan.py Passes): a unit's NTP rows
    and texts are separate forwards of GEMModel, its loss one ``engine.backward``; a micro-batch's
    last unit ends with ``engine.step()`` (DeepSpeed steps the optimizer at the accumulation
    boundary), the units before it marked as no boundary. The fast path's prefill runs inside
    the model's "embed" forward, so there is no prefill pass here."""

    def __init__(self, owner: DeepSpeedEngine, *, ntp_scale: float, w_cl: float, accum: int):
        self.owner, self.engine, self.ntp_scale, self.w_cl, self.accum = owner, owner.engine, ntp_scale, w_cl, accum
        self.own_norm = None

    def forward_backward(self, units: list[Unit], *, finalize: bool = True) -> list[dict]:
        engine, owner, records = self.engine, self.owner, []
        for u in units:
            record = {"ntp_sum": None, "ntp_tokens": 0, "cl": None, "tokens": 0}
            if u.cached is None:
                loss = torch.zeros((), device=owner.device)
            else:  # GradCache pass 2: the chunk's surrogate; the micro-batch's NTP rows ride with chunk 0
                u.begin_forward()
                emb, scale = engine(u.cl, "embed")
                loss = u.surrogate(emb, scale)
                record["tokens"] += int((u.cl["doc_ids"] >= 0).sum())
            if u.ntp is not None:
                part = ntp_micro_loss(engine, u.ntp, scale=self.ntp_scale)
                loss = loss + part.loss
                record.update(ntp_sum=part.ntp_sum, ntp_tokens=part.ntp_tokens, tokens=record["tokens"] + part.tokens)
            if u.cl is not None and u.cached is None:
                part = contrastive_micro_loss(engine, u.cl, gather_keys=owner.gather_keys, weight=self.w_cl, distill=owner.distill)
                loss = loss + part.loss
                record.update(cl=part.cl_loss, tokens=record["tokens"] + part.tokens)
            if not u.last:
                engine.set_gradient_accumulation_boundary(False)
            engine.backward(loss)
            if not u.last:
                engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own count
            if u.last:
                if u.micro == self.accum - 1 and owner._own_grad_norm:
                    self.own_norm = grad_norm_of(engine.module)
                engine.step()
            records.append(record)
        return records

    def forward_only(self, units: list[Unit]) -> list:
        out = []
        with torch.no_grad():
            for u in units:
                u.begin_forward(pass_one=True)
                out.append(self.engine(u.cl, "embed"))
        return out

    def prefill(self, units: list[Unit]):
        raise NotImplementedError("DeepSpeed runs the summary fast path's prefill inside the model's forward (StepPlan prefill_pass=False)")


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
        accum = max(len(ntp_batches), len(cl_batches))
        ntp_batches = [to_device(b, self.device) for b in ntp_batches]
        cl_batches = [to_device(b, self.device) for b in cl_batches]
        scale = ntp_loss_scale(w_ntp, dp_size=self.dp_size, accum_steps=accum, global_tokens=global_tokens)
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
        passes = DeepSpeedPasses(self, ntp_scale=scale, w_cl=w_cl, accum=accum)
        plan = StepPlan.of(self.job, cl_batches, prefill_pass=False)  # the fast path's prefill runs inside the "embed" forward
        records = run_step(plan, passes, ntp_batches, cl_batches, w_cl=w_cl, gather_keys=self.gather_keys, distill=self.distill)
        grad_norm = passes.own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        return step_output(records, lr=lr, grad_norm=grad_norm, reporter=True, logit_scale=read_logit_scale(self.engine.module))

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
