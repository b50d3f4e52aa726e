"""The megatron-core engine: tensor, pipeline and data parallelism (distributed optimizer),
sequence parallelism and activation recomputation; GPU with NCCL, CPU with gloo. The hooks
run.py calls; everything else (data, phases, schedule, metrics, checkpoint protocol,
resume, export cadence, pre-emption) is the trainer's, shared with the DeepSpeed engine.

* the model is megatron-core's GPTModel (mcore/gpt_model.py, built by mcore.provider) with GEM
  core attention; ``--model`` is an HF checkpoint (GEM tokens added with mean rows when
  missing) or a megatron checkpoint written by tools/convert_checkpoint.py;
* one optimizer step = the passes training/step_plan.py composes (plain, summary fast path,
  GradCache, any mix), each one megatron-core forward_backward_func call over its units
  (``MegatronPasses``; 1F1B pipeline schedule when PP > 1), then the megatron optimizer step;
* a phase-2 micro-batch with alpha < 1 carries its NTP rows and its contrastive rows in one
  forward (rows [:n] NTP, rows [n:] the contrastive texts), so every pipeline message has one
  shape per step;
* a GradCache pass (``--contrastive-micro-batch-size``; PP = 1) scales each chunk's surrogate
  loss back by the chunk count the schedule divides by; the summary fast path's prefill is a
  forward-only pass whose record mcore/summary.py's ``SummaryFastPath`` keeps for the step;
* checkpoints are megatron-core dist_checkpointing (model + distributed optimizer), which
  ``tools/convert_checkpoint.py megatron-to-hf`` also reads;
* summary mode (``--gem-train summary``, mcore/summary.py): the base is frozen, only the adapter
  (and the logit scale) reach DDP's grad buffers and the optimizer; checkpoints hold only what
  trains (the adapter, the logit scale, their optimizer state), as DeepSpeed's
  ``exclude_frozen_parameters`` does: the frozen base is ``--model``, never rewritten, and a
  resume takes it from there; the export is the HF-named adapter (hf/export.py
  export_summary_adapter_state, the PEFT aLoRA folder).

Loss scaling matches the DeepSpeed path: a micro-batch's NTP sum is scaled by
dp * accum / global_tokens; megatron-core divides each micro-batch loss by accum and averages
gradients over data-parallel ranks, leaving sum / global_tokens (+ the mean InfoNCE). The loss
itself is mcore/loss.py's, the one the Megatron-LM integration uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil

import torch
import torch.distributed as dist

from ..attention.megatron import gem_mask_info
from ..common import distributed as D
from ..common.files import write_json_atomic
from ..gem.losses import Distillation
from ..mcore import checkpoint_io as io
from ..mcore.forward_rows import join_rows, unwrap_model
from ..mcore.loss import contrastive_embeddings, gem_micro_batch_loss
from ..mcore.summary import SummaryFastPath
from .args import ArgumentError
from .run import Engine
from .schedule import lr_for_step
from .step import StepOutput, ntp_loss_scale
from .step_plan import StepPlan, Unit, run_step, step_output
from .validation import EvalParts

STATE_NAME = "gem_state.json"
# megatron-core 0.16's distributed-optimizer formats with torch Adam (no TE/apex): the
# "fully_reshardable" loader fails on Adam's "step" entry and "fully_sharded_model_space" is no
# longer accepted by dist_checkpointing; "dp_reshardable" works (resume at the same TP/PP, any DP).
OPTIM_CKPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def contrastive_rows(num_texts: int, seq_length: int, max_text_len: int, max_negatives: int = 0) -> int:
    """Rows that always hold the N anchors, N positives and up to N x ``max_negatives`` hard
    negatives, texts of <= max_text_len tokens, under first-fit decreasing packing: a new row
    opens only when every open row has >= floor(S/T) texts."""
    per_row = max(1, seq_length // max_text_len)
    return math.ceil((2 + max_negatives) * num_texts / per_row)


class EvalForward:
    """forward_step_func of a forward-only validation pass: the loss function keeps the
    per-token NTP cross-entropy (the model's, mcore/loss.py) and the summary embeddings
    (validation.EvalParts)."""

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(
            batch["input_ids"], batch["position_ids"], gem_mask_info(batch["doc_ids"], batch["roles"]), ntp_rows=batch["ntp_rows"], labels=batch["labels"]
        )
        return output, lambda out: self.parts(batch, unwrap_model(model), out)

    @staticmethod
    def parts(batch, model, output):
        losses, states = output
        N = batch["num_texts"]
        emb = contrastive_embeddings(batch, states)
        parts = EvalParts(token_losses=losses, anchors=emb[:N], positives=emb[N : 2 * N], logit_scale=float(model.logit_scale()))
        return torch.zeros((), device=batch["input_ids"].device), parts


class StepLoss:
    """The loss_func of a unit's forward (megatron-core schedule API): its micro-batch loss
    (mcore/loss.py), and its per-unit record."""

    def __init__(self, *, w_ntp: float, w_cl: float, ntp_scale: float, gather_keys, distill=None):
        self.w_ntp, self.w_cl, self.ntp_scale, self.gather_keys, self.distill = w_ntp, w_cl, ntp_scale, gather_keys, distill

    def loss(self, batch, model, output):
        out = gem_micro_batch_loss(
            batch, model, output, w_ntp=self.w_ntp, w_cl=self.w_cl, gather_keys=self.gather_keys, ntp_scale=self.ntp_scale, distill=self.distill
        )
        stats = {"ntp_sum": out.ntp_sum, "ntp_tokens": out.ntp_tokens, "cl": float(out.cl) if out.cl is not None else None, "tokens": out.tokens}
        return out.total, stats


def _reporter() -> bool:
    """The one rank per data-parallel replica that reports losses: last stage, TP rank 0."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _restore_adam_step(optimizer, saved: dict) -> None:
    """torch Adam keeps its step count per parameter state; megatron-core's distributed optimizer
    saves it once (in param_groups) and on load with torch Adam leaves one step tensor shared by
    all parameters (so every step advances it once per parameter: wrong bias correction).
    Put the saved count back, one tensor per parameter."""
    groups = (saved.get("optimizer") or {}).get("param_groups", []) if isinstance(saved, dict) else []
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) != 1:
        return
    step = float(steps.pop())
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                # A tensor of its own per parameter: the loaded states share one step tensor,
                # which torch Adam would then advance once per parameter.
                state["step"] = torch.full_like(state["step"], step)


def check_trained_dtype(named_parameters, dtype: torch.dtype) -> None:
    """Every parameter that trains must be in the model's ``params_dtype``: megatron-core 0.16's
    mixed-precision optimizers step a mixed set, but their checkpoints cannot describe it (the
    distributed optimizer's state lookup is off by a parameter group's fp32 parameters, and a
    small fp32 buffer leaves some data-parallel rank an empty shard it refuses;
    Float16OptimizerWithFloat16Params maps only its 16-bit parameters), so the run would crash
    at its first save. Raise when the model is built, naming them, instead."""
    odd = [f"{name} ({str(p.dtype).replace('torch.', '')})" for name, p in named_parameters if p.requires_grad and p.dtype != dtype]
    if odd:
        raise RuntimeError(
            f"trained parameters not in the model's {str(dtype).replace('torch.', '')} (megatron-core's optimizer checkpoints need one dtype): {', '.join(odd[:5])}"
        )


class MegatronPasses:
    """How megatron-core runs the passes of a step (training/step_plan.py Passes): each pass is
    one forward_backward_func call over its units (the 1F1B pipeline schedule when PP > 1), a
    unit's NTP and contrastive rows joined into one forward (rows [:n] NTP, rows [n:] texts);
    the summary fast path's prefill is a forward-only pass (mcore/summary.py SummaryFastPath)."""

    def __init__(self, engine: MegatronEngine, loss: StepLoss):
        self.engine, self.step_loss = engine, loss

    def _batch(self, u: Unit, *, with_ntp: bool = True) -> dict:
        if "attention_mask" in (u.cl or {}):  # a summary step: prepared by the prefill
            return u.cl
        return join_rows(u.ntp if with_ntp else None, u.cl, self.engine.device)

    def _run(self, units: list[Unit], batches: list[dict], forward_step, *, forward_only: bool = False):
        return self.engine._schedule(forward_step, batches, forward_only=forward_only, seq_length=units[0].extra.get("seq_length"))

    def forward_backward(self, units: list[Unit], *, finalize: bool = True) -> list[dict]:
        queue = iter(units)

        def step(data_iterator, model):
            batch, u = next(data_iterator), next(queue)
            u.begin_forward()
            output = model(batch["input_ids"], batch["position_ids"], _mask_of(batch), ntp_rows=batch["ntp_rows"], labels=batch["labels"])
            inner = unwrap_model(model)
            if u.cached is None:
                return output, lambda out: self.step_loss.loss(batch, inner, out)
            return output, lambda out: self._surrogate(u, batch, inner, out)

        batches = [self._batch(u) for u in units]
        with contextlib.nullcontext() if finalize else self._grads_finalized_later():
            return self._run(units, batches, step)

    @contextlib.contextmanager
    def _grads_finalized_later(self):
        """A forward-backward schedule that leaves its gradients in the buffers unreduced: the
        step's last schedule finalizes (data-parallel all-reduce / reduce-scatter, sequence-
        parallel norms) everything once; finalizing twice would reduce the first part again."""
        config = self.engine.config
        finalize = config.finalize_model_grads_func
        config.finalize_model_grads_func = None
        try:
            yield
        finally:
            config.finalize_model_grads_func = finalize

    def _surrogate(self, u: Unit, batch, model, output):
        """GradCache pass 2: the unit's NTP part (and the zero touches) plus its surrogate."""
        sl = self.step_loss
        ntp = gem_micro_batch_loss(batch, model, output, w_ntp=sl.w_ntp, w_cl=0.0, ntp_scale=sl.ntp_scale)
        loss = ntp.total + u.surrogate(contrastive_embeddings(batch, output[1]), model.logit_scale())
        # The schedule divides every loss by its number of units (accum x chunks); the step's
        # loss is a mean over the accum micro-batches only.
        record = {"ntp_sum": ntp.ntp_sum, "ntp_tokens": ntp.ntp_tokens, "cl": None, "tokens": ntp.tokens}
        return loss * u.chunks, record

    def forward_only(self, units: list[Unit]) -> list:
        def embed_step(data_iterator, model):
            batch, u = next(data_iterator), next(queue)
            u.begin_forward(pass_one=True)
            output = model(batch["input_ids"], batch["position_ids"], _mask_of(batch), ntp_rows=0)
            inner = unwrap_model(model)
            return output, lambda out: (torch.zeros((), device=self.engine.device), (contrastive_embeddings(batch, out[1]), inner.logit_scale()))

        queue = iter(units)
        with torch.no_grad():
            return list(self._run(units, [self._batch(u, with_ntp=False) for u in units], embed_step, forward_only=True))

    @contextlib.contextmanager
    def prefill(self, units: list[Unit]):
        micro = [join_rows(None, u.cl, self.engine.device) for u in units]

        def prefill_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], ntp_rows=0)
            return output, lambda out: (torch.zeros((), device=self.engine.device), {})

        with SummaryFastPath(self.engine.model) as fast:
            with torch.no_grad():
                self.engine._schedule(prefill_step, fast.prefill_batches(micro), forward_only=True)
            steps, width = fast.step_batches(micro)
            # a summary step stands for every token of its micro-batch (or chunk), not only its summary tokens
            yield [
                dataclasses.replace(u, ntp=None, cl=b, tokens=int((m["doc_ids"] >= 0).sum()), extra={"seq_length": max(width, 1)})
                for u, b, m in zip(units, steps, micro)
            ]


def _mask_of(batch: dict):
    """The attention_mask argument of a unit's batch: its own (a summary step's), else its GEM metadata."""
    return batch["attention_mask"] if "attention_mask" in batch else gem_mask_info(batch["doc_ids"], batch["roles"])


class MegatronEngine(Engine):
    name = "megatron-core"

    def init_distributed(self, job) -> None:
        from megatron.core import parallel_state

        from ..mcore.runtime import init_model_parallel

        p = job.parallel
        init_model_parallel(
            p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=job.optimizer.seed, timeout_minutes=job.run.distributed_timeout_minutes
        )
        self.dp_rank, self.dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.device = D.bind_local_device()

    def build(self, job, tokenizer) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ..mcore.provider import build_gem_model

        p, o = job.parallel, job.optimizer
        dtype = torch.bfloat16 if job.model.bf16 else torch.float32
        try:
            built = build_gem_model(
                job.model.path,
                tokenizer,
                job.gem,
                tp=p.tensor_model_parallel_size,
                pp=p.pipeline_model_parallel_size,
                dtype=dtype,
                backend=job.model.attention_backend,
                sequence_parallel=p.sequence_parallel,
                recompute_granularity=p.recompute_granularity,
                recompute_method=p.recompute_method,
                recompute_num_layers=p.recompute_num_layers,
                make_vocab_size_divisible_by=p.make_vocab_size_divisible_by,
                seq_length=job.batch.seq_length,
                seed=o.seed,
            )
        except ValueError as e:  # a layout the model cannot take (heads, window): name the flag
            if type(e) is not ValueError:
                raise
            raise ArgumentError(str(e)) from e
        self.job, self.tokenizer = job, tokenizer
        self.model, self.arch, self.config, self.meta, self.layer_impl = built.model, built.arch, built.config, built.meta, built.layer_impl
        check_trained_dtype(self.model.named_parameters(), self.config.params_dtype)
        self.ddp = DistributedDataParallel(
            config=self.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=p.use_distributed_optimizer
            ),
            module=self.model,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=1e-8,
                clip_grad=o.clip_grad,
                bf16=job.model.bf16,
                params_dtype=dtype,
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            [self.ddp],
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.ddp.no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.gather_keys = D.make_gather_keys(self.dp_group)
        self.distill = Distillation.from_config(job.gem)  # used where a batch carries the teacher's rows
        self.forward_backward = get_forward_backward_func()
        self.ddp.train()

    def adapt_loaders(self, job, ntp_loader, contrastive_loader) -> None:
        if contrastive_loader is not None and job.parallel.pipeline_model_parallel_size > 1:  # pipeline messages need one shape: fixed row count
            ds = contrastive_loader.dataset
            most = ds.negatives.max_per_record if ds.negatives is not None else 0
            ds.num_rows = contrastive_rows(job.batch.contrastive_batch_size, job.batch.seq_length, ds.max_text_len, most)

    def describe(self) -> str:
        p = self.job.parallel
        return (
            f"megatron-core TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} DP={self.dp_size} (distributed optimizer: "
            f"{p.use_distributed_optimizer}, SP: {self.config.sequence_parallel}, recompute: {self.config.recompute_granularity}; "
            f"{self.layer_impl.describe()}; Adam: {self.adam_class()})"
            + (f", summary mode: base frozen; {self.trained_elements()} on this rank{self.summary_path()}" if self.job.gem.summary_mode else "")
        )

    def adam_class(self) -> str:
        """The Adam megatron-core's optimizer built: TE's or apex's FusedAdam when they import,
        else torch's (megatron/core/optimizer/__init__.py picks it)."""
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        names = {f"{type(o.optimizer).__module__}.{type(o.optimizer).__name__}" for o in opts if getattr(o, "optimizer", None) is not None}
        return ", ".join(sorted(names)) or "none"

    def summary_path(self) -> str:
        """How phase 2 runs in summary mode (the fast path needs contrastive-only micro-batches)."""
        b = self.job.batch
        if not self.job.model.summary_fast_path:
            return "; phase 2: full rows with autograd (--no-gem-summary-fast-path)"
        ntp = "; the NTP rows (--gem-alpha < 1) in a schedule of their own" if self.job.gem.alpha < 1 else ""
        cache = "; GradCache over the summary tokens (--contrastive-micro-batch-size)" if b.contrastive_micro_batch_size is not None else ""
        return f"; phase 2: fast path (no-grad prefill, autograd through the summary tokens only{ntp}{cache})"

    def trained_elements(self) -> str:
        """What this rank trains, counted where it is held: requires_grad parameters, DDP's
        grad buffers, the optimizer's (main) parameters."""
        grad = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        buffered = sum(p.numel() for buf in self.ddp.buffers for p in buf.params)
        optimized = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        return f"trainable {grad}, in grad buffers {buffered}, in the optimizer {optimized} elements"

    def _schedule(self, forward_step, micro: list, forward_only: bool = False, seq_length: int | None = None):
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[self.ddp],
            num_microbatches=len(micro),
            seq_length=seq_length or self.job.batch.seq_length,
            micro_batch_size=micro[0]["input_ids"].shape[0],
            forward_only=forward_only,
        )

    def train_step(self, step, *, w_ntp, w_cl, ntp_batches, cl_batches, global_tokens) -> StepOutput:
        accum = max(len(ntp_batches), len(cl_batches))
        lr = lr_for_step(step, self.job)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = ntp_loss_scale(w_ntp, dp_size=self.dp_size, accum_steps=accum, global_tokens=global_tokens)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        plan = StepPlan.of(self.job, cl_batches, prefill_pass=True)
        passes = MegatronPasses(self, StepLoss(w_ntp=w_ntp, w_cl=w_cl, ntp_scale=scale, gather_keys=self.gather_keys, distill=self.distill))
        records = run_step(plan, passes, ntp_batches, cl_batches, w_cl=w_cl, gather_keys=self.gather_keys, distill=self.distill)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:  # megatron-core found inf/nan gradients and skipped the update
            grad_norm = float("nan")
        logit_scale = float(self.model.logit_scale()) if self.model.post_process else None
        return step_output(records, lr=lr, grad_norm=grad_norm, reporter=_reporter(), logit_scale=logit_scale)

    def eval_step(self, ntp_batches, cl_batches):
        micro = [join_rows(a, b, self.device) for a, b in zip(ntp_batches, cl_batches)]
        self.ddp.eval()
        try:
            with torch.no_grad():
                parts = self.forward_backward(
                    forward_step_func=EvalForward().forward_step,
                    data_iterator=iter(micro),
                    model=[self.ddp],
                    num_microbatches=len(micro),
                    seq_length=self.job.batch.seq_length,
                    micro_batch_size=micro[0]["input_ids"].shape[0],
                    forward_only=True,
                )
        finally:
            self.ddp.train()
        return list(parts), _reporter()

    def save(self, save_dir, tag, state) -> None:
        """Model + distributed optimizer (dist_checkpointing; torch.distributed.checkpoint raises
        a write error of any rank on all of them), the trainer's state, the model metadata,
        tokenizer and gem_config (so the tag directory is a megatron checkpoint the converter
        reads)."""
        from megatron.core import dist_checkpointing

        path = os.path.join(save_dir, tag)
        os.makedirs(path, exist_ok=True)
        msd = self._checkpointed_state()
        dist_checkpointing.save({"model": msd, "optimizer": self.optimizer.sharded_state_dict(msd, metadata=OPTIM_CKPT_META)}, path)
        if dist.get_rank() == 0:
            write_json_atomic(os.path.join(path, STATE_NAME), state)
            meta = self.meta if not self.job.gem.summary_mode else {**self.meta, io.ADAPTER_ONLY: {"base": self.job.model.path}}
            write_json_atomic(os.path.join(path, io.META_NAME), meta)
            self.tokenizer.save_pretrained(path)
            self.job.gem.save(path)

    def _checkpointed_state(self) -> dict:
        """The model's sharded state dict as checkpoints hold it: all of it, or in summary mode
        only the parameters that train (the frozen base is --model; writing it again at every
        save would cost the base's size each time for bytes that never change)."""
        msd = self.model.sharded_state_dict()
        if not self.job.gem.summary_mode:
            return msd
        trained = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in msd.items() if k in trained}

    @property
    def save_errors(self) -> tuple:
        from torch.distributed.checkpoint.api import CheckpointException

        return (CheckpointException,)

    def load(self, load_dir, tag) -> dict:
        from megatron.core import dist_checkpointing

        model, optimizer, path = self.model, self.optimizer, os.path.join(load_dir, tag)
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            # megatron-core's distributed optimizer with torch Adam (no TE/apex) cannot describe an
            # optimizer that has not stepped yet; give it (dummy) states, which the load replaces.
            if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()
        msd = self._checkpointed_state()
        sharded = {"model": msd, "optimizer": optimizer.sharded_state_dict(msd, is_loading=True, metadata=OPTIM_CKPT_META)}
        loaded = dist_checkpointing.load(sharded, path)
        missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
        kept = set(model.state_dict()) - set(msd) if self.job.gem.summary_mode else set()  # the frozen base, from --model
        missing = [k for k in missing if not k.endswith("_extra_state") and k not in kept]
        if missing or unexpected:
            raise RuntimeError(f"{path}: model state does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step(optimizer, loaded["optimizer"])
        self._note_base(path)
        with open(os.path.join(path, STATE_NAME)) as f:
            return json.load(f)

    def _note_base(self, path: str) -> None:
        """Summary mode: say so when the adapter trained on one base is resumed on another
        --model (a moved copy is fine; a different model is the user's call, not ours)."""
        meta_path = os.path.join(path, io.META_NAME)
        if not self.job.gem.summary_mode or not os.path.isfile(meta_path):
            return
        with open(meta_path) as f:
            base = (json.load(f).get(io.ADAPTER_ONLY) or {}).get("base")
        if base is not None and os.path.realpath(base) != os.path.realpath(self.job.model.path):
            D.print_main(f"[megatron-gem] --load {path}: the adapter was trained on the frozen base {base}; --model is {self.job.model.path}")

    def export_hf(self, out_dir, extra) -> None:
        if self.job.gem.summary_mode:  # the base is --model, unchanged: only the adapter is written
            from ..hf.export import export_summary_adapter_state
            from ..mcore.summary import hf_adapter_state

            base_path, self_contained = self.job.model.path, self.job.checkpoint.hf_export_self_contained
            converted = None  # the HF conversion of a megatron --model, removed after the export
            if io.is_megatron_checkpoint(base_path):
                # The adapter needs an HF base and a megatron --model has none: write the frozen
                # base (unchanged weights) as HF once, into the folder itself (base/).
                import dataclasses

                from ..common.outputs import fresh_tmp_dir

                # a fresh name: nothing already there is replaced
                base_path = converted = D.from_main(lambda: fresh_tmp_dir(out_dir.rstrip("/") + ".base"))
                self_contained = True
                plain = dataclasses.replace(self.job.gem, train_mode="full")
                io.export_hf_from_model(
                    self.model,
                    self.arch,
                    base_path,
                    hf_config=self.meta["hf_config"],
                    vocab_size=self.meta["vocab_size"],
                    tokenizer=self.tokenizer,
                    gem_config=plain,
                )
            state = hf_adapter_state(self.model, self.arch)
            if dist.get_rank() == 0:
                self.job.gem.base_model = self.job.gem.base_model or self.job.model.path
                export_summary_adapter_state(
                    state, self.meta["hf_config"], self.tokenizer, self.job.gem, out_dir, extra, base_path=base_path, self_contained=self_contained
                )
                if converted is not None:  # never --model itself
                    shutil.rmtree(converted, ignore_errors=True)
            D.barrier()
            return
        io.export_hf_from_model(
            self.model,
            self.arch,
            out_dir,
            hf_config=self.meta["hf_config"],
            vocab_size=self.meta["vocab_size"],
            tokenizer=self.tokenizer,
            gem_config=self.job.gem,
            extra=extra,
        )

    def report(self) -> dict:
        p = self.job.parallel
        return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size, "dp_size": self.dp_size}

    def shutdown(self) -> None:
        from ..mcore.runtime import destroy

        destroy()
