"""GEM post-training with megatron-core: tensor, pipeline and data parallelism (distributed
optimizer), sequence parallelism and activation recomputation; GPU with NCCL, CPU with gloo.

It mirrors the DeepSpeed engine (deepspeed_engine.py): same flags, data pipeline, two-phase
losses and LR schedule, metrics.jsonl, atomic ``latest`` checkpoints with exact resume, and the
HF export (SAVE/hf with gem_config.json) at the end. Only the wiring differs:

* the model is megatron-core's GPTModel (models.llama) with GEM core attention; ``--model`` is an
  HF checkpoint (GEM tokens added with mean rows when missing) or a megatron checkpoint written
  by tools/convert_checkpoint.py;
* one optimizer step = megatron-core's forward_backward_func over ``accum`` micro-batches
  (1F1B pipeline schedule when PP > 1), then the megatron optimizer step;
* a phase-2 micro-batch with alpha < 1 carries its NTP rows and its contrastive rows in one
  forward (rows [:n] NTP, rows [n:] the contrastive texts), so every pipeline message has one
  shape per step;
* checkpoints are megatron-core dist_checkpointing (model + distributed optimizer), which
  ``tools/convert_checkpoint.py megatron-to-hf`` also reads.

Loss scaling matches the DeepSpeed path: a micro-batch's NTP sum is scaled by
dp * accum / global_tokens; megatron-core divides each micro-batch loss by accum and averages
gradients over data-parallel ranks, leaving sum / global_tokens (+ the mean InfoNCE).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..attention.megatron import gem_mask_info
from ..data import DataError
from ..gem.losses import info_nce, loss_weights
from ..gem.readout import pool_special_states
from ..gem.roles import IGNORE_INDEX
from ..gem.tokens import add_gem_tokens, find_gem_tokens
from ..models import checkpoint_io as io
from ..models.batch import join_rows, unwrap_model
from ..models.hf_mapping import HFWeights, load_hf_into_model
from ..models.llama import UnsupportedModelError, arch_from_hf_config, build_gem_gpt_model, padded_vocab_size, transformer_config
from . import distributed as D
from .args import ArgumentError, gem_config_from_args
from ..common.files import write_json_atomic
from ..common.manifest import CheckpointError
from .checkpoint import CheckpointWriteError, agree_on_write, commit_checkpoint, resolve_checkpoint, rng_state, set_rng_state, tag_for
from .guard import NonFiniteError
from .data_setup import build_loaders, data_summary, open_training_corpus
from .megatron_args import validate_megatron_args
from .loop import StepBookkeeping
from .metrics import MetricsLogger
from .model import ModelLoadError, load_tokenizer
from .schedule import lr_for_step

STATE_NAME = "gem_state.json"
# megatron-core 0.16's distributed-optimizer formats with torch Adam (no TE/apex): the
# "fully_reshardable" loader fails on Adam's "step" entry and "fully_sharded_model_space" is no
# longer accepted by dist_checkpointing; "dp_reshardable" works (resume at the same TP/PP, any DP).
OPTIM_CKPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


# ------------------------------------------------------------------------ model loading
class _EmbeddingTables(torch.nn.Module):
    """Just the embedding (and untied LM head) of an HF checkpoint, with the interface
    gem.tokens.add_gem_tokens uses, so GEM tokens are added by the method's own code without
    loading the whole model on every rank."""

    def __init__(self, embed: torch.Tensor, head: torch.Tensor | None):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(embed.clone(), freeze=False)
        self.head = None
        if head is not None:
            self.head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype)
            self.head.weight = torch.nn.Parameter(head.clone())

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def resize_token_embeddings(self, n: int, mean_resizing: bool = False):
        def grow(w: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.cat([w.data, w.data.new_zeros(n - w.shape[0], w.shape[1])]))

        self.embed.weight = grow(self.embed.weight)
        if self.head is not None:
            self.head.weight = grow(self.head.weight)


def load_hf_source(path: str, tokenizer, gem_config):
    """(arch, HF config dict, weight getter, vocab) of an HF checkpoint, GEM tokens added."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {path}: cannot read an HF config ({e})") from e
    arch = arch_from_hf_config(hf_config)
    weights = HFWeights(path)
    head = None if arch.tie_word_embeddings else weights("lm_head.weight")
    tables = _EmbeddingTables(weights("model.embed_tokens.weight"), head)
    add_gem_tokens(tables, tokenizer, gem_config)
    with torch.no_grad():
        weights.overrides["model.embed_tokens.weight"] = tables.embed.weight.detach()
        if head is not None:
            weights.overrides["lm_head.weight"] = tables.head.weight.detach()
    vocab = tables.embed.weight.shape[0]
    arch.vocab_size = vocab
    return arch, hf_config.to_dict(), weights, vocab


def build_model(args, tokenizer, gem_config):
    """This rank's GEM GPTModel with weights, and what export needs: (model, arch, meta)."""
    from megatron.core import parallel_state

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if io.is_megatron_checkpoint(args.model):
        meta = io.read_meta(args.model)
        from ..models.llama import LlamaArch

        arch = LlamaArch.from_dict(meta["arch"])
        vocab, padded = meta["vocab_size"], meta["padded_vocab_size"]
        if padded % tp:
            raise ModelLoadError(f"--model {args.model}: padded vocabulary {padded} is not divisible by TP={tp}; re-convert with --tensor-model-parallel-size {tp}")
        ids = find_gem_tokens(tokenizer, gem_config)
        if ids is None:
            raise ModelLoadError(f"--model {args.model}: the checkpoint has no GEM tokens; add them to the HF checkpoint with tools/add_gem_tokens.py before converting")
        gem_config.special_token_ids = ids
        source = None
        hf_config = meta["hf_config"]
    else:
        arch, hf_config, source, vocab = load_hf_source(args.model, tokenizer, gem_config)
        padded = padded_vocab_size(vocab, tp, args.make_vocab_size_divisible_by)
    if arch.sliding_window and args.seq_length > arch.sliding_window:
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds {arch.architecture}'s sliding window {arch.sliding_window}; GEM attention "
            f"implements full (windowless) attention, exact only up to the window"
        )
    try:
        config = transformer_config(
            arch,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=args.sequence_parallel,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            params_dtype=dtype,
        )
    except ValueError as e:
        raise ArgumentError(str(e)) from e
    model = build_gem_gpt_model(
        arch,
        config,
        vocab_size=vocab,
        padded_vocab=padded,
        backend=args.attention_backend,
        suffix_sees_bos=gem_config.suffix_sees_bos,
        logit_scale_init=gem_config.logit_scale_init,
        logit_scale_max=gem_config.logit_scale_max,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if source is not None:
        load_hf_into_model(model, source, arch, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp)
    else:
        io.load_model(model, args.model)
    meta = io.make_meta(arch, vocab_size=vocab, padded_vocab=padded, tp=tp, pp=pp, hf_config=hf_config, divisible_by=args.make_vocab_size_divisible_by)
    meta["dtype"] = str(dtype).replace("torch.", "")
    return model, arch, config, meta


def contrastive_rows(num_texts: int, seq_length: int, max_text_len: int) -> int:
    """Rows that always hold 2N texts of <= max_text_len tokens under first-fit decreasing
    packing: a new row opens only when every open row has >= floor(S/T) texts."""
    per_row = max(1, seq_length // max_text_len)
    return math.ceil(2 * num_texts / per_row)


# ---------------------------------------------------------------------------- one step
class StepLoss:
    """forward_step_func / loss_func pair of one optimizer step (megatron-core schedule API)."""

    def __init__(self, *, w_ntp: float, w_cl: float, global_tokens: int, dp_size: int, accum: int, gather_keys):
        self.w_ntp, self.w_cl = w_ntp, w_cl
        self.ntp_scale = w_ntp * dp_size * accum / max(global_tokens, 1)
        self.gather_keys = gather_keys

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["input_ids"], batch["position_ids"], gem_mask_info(batch["doc_ids"], batch["roles"]), ntp_rows=batch["ntp_rows"])
        return output, partial(self.loss, batch, unwrap_model(model))

    def loss(self, batch, model, output):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits, states = output
        n = batch["ntp_rows"]
        total = torch.zeros((), device=batch["input_ids"].device)
        stats = {"ntp_sum": 0.0, "ntp_tokens": 0, "cl": None, "tokens": int((batch["doc_ids"] >= 0).sum())}
        if n:
            labels = batch["labels"]
            keep = labels != IGNORE_INDEX
            per_token = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))
            ntp_sum = (per_token * keep).sum()
            total = total + ntp_sum * self.ntp_scale
            stats.update(ntp_sum=float(ntp_sum.detach()), ntp_tokens=int(keep.sum()))
        if batch["num_texts"]:
            N = batch["num_texts"]
            emb = pool_special_states(states, batch["roles"][n:], batch["doc_ids"][n:], 2 * N)
            cl = info_nce(emb[:N], emb[N:], model.logit_scale(), gather_keys=self.gather_keys)
            total = total + self.w_cl * cl
            stats["cl"] = float(cl.detach())
        return total, stats


def _reporter() -> bool:
    """The one rank per data-parallel replica that reports losses: last stage, TP rank 0."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def step_record(step, stats: list[dict], w_ntp, w_cl, global_tokens, lr, grad_norm, seconds, dp_size, logit_scale) -> dict:
    """metrics.jsonl line (same fields as the DeepSpeed engine), reduced over all ranks."""
    mine = _reporter()
    cls = [s["cl"] for s in stats if s["cl"] is not None] if mine else []
    v = torch.tensor(
        [
            sum(s["ntp_sum"] for s in stats) if mine else 0.0,
            (sum(cls) / len(cls)) if cls else 0.0,
            1.0 if cls else 0.0,
            sum(s["tokens"] for s in stats) if mine else 0.0,
            logit_scale if (mine and logit_scale is not None) else 0.0,
        ],
        dtype=torch.float64,
    )
    v = D.all_reduce_sum(v.to(_comm_device())).cpu()
    ntp = float(v[0]) / global_tokens if w_ntp > 0 and global_tokens else None
    cl = float(v[1]) / float(v[2]) if w_cl > 0 and v[2] > 0 else None
    loss = (w_ntp * ntp if ntp is not None else 0.0) + (w_cl * cl if cl is not None else 0.0)
    return {
        "step": step + 1,
        "phase": 1 if w_cl == 0 else 2,
        "loss": loss,
        "ntp_loss": ntp,
        "cl_loss": cl,
        "lr": lr,
        "tokens_per_s": float(v[3]) / seconds,
        "logit_scale": float(v[4]) / dp_size,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "step_time_s": seconds,
    }


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(model, optimizer, save_dir: str, step: int, state: dict, meta: dict, tokenizer, gem_config) -> str:
    """Model + distributed optimizer (dist_checkpointing), RNG per rank, loader state; then the
    manifest and ``latest`` (commit_checkpoint). The tag directory is also a megatron checkpoint
    that tools/convert_checkpoint.py megatron-to-hf reads."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    tag = tag_for(step)
    path = os.path.join(save_dir, tag)
    error = None
    try:
        os.makedirs(path, exist_ok=True)
        msd = model.sharded_state_dict()
        sharded = {"model": msd, "optimizer": optimizer.sharded_state_dict(msd, metadata=OPTIM_CKPT_META)}
        # Collective; torch.distributed.checkpoint gathers a write error of any rank and raises
        # it on all of them (CheckpointException), so no rank is left waiting.
        dist_checkpointing.save(sharded, path)
        torch.save(rng_state(), os.path.join(path, f"rng_state_rank{dist.get_rank()}.pt"))
        if dist.get_rank() == 0:
            write_json_atomic(os.path.join(path, STATE_NAME), state)
            write_json_atomic(os.path.join(path, io.META_NAME), meta)
            tokenizer.save_pretrained(path)
            gem_config.save(path)
    except (OSError, CheckpointException) as e:
        error = e
    agree_on_write(path, error, partial=path)
    commit_checkpoint(save_dir, tag, step=step, engine="megatron-core")
    return tag


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


def load_checkpoint(model, optimizer, load_dir: str, tag: str) -> dict:
    """Resume from ``load_dir/tag`` (resolve_checkpoint chose and verified it)."""
    from megatron.core import dist_checkpointing

    path = os.path.join(load_dir, tag)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # megatron-core's distributed optimizer with torch Adam (no TE/apex) cannot describe an
        # optimizer that has not stepped yet; give it (dummy) states, which the load replaces.
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
    msd = model.sharded_state_dict()
    sharded = {"model": msd, "optimizer": optimizer.sharded_state_dict(msd, is_loading=True, metadata=OPTIM_CKPT_META)}
    loaded = dist_checkpointing.load(sharded, path)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: model state does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_step(optimizer, loaded["optimizer"])
    rng_path = os.path.join(path, f"rng_state_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))  # our own file
    with open(os.path.join(path, STATE_NAME)) as f:
        return json.load(f)


# --------------------------------------------------------------------------------- loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(args) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..models.runtime import init_model_parallel

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    init_model_parallel(tp, pp, seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    stop = D.exit_signal_handler(args.exit_signal_handler)
    dp_size = validate_megatron_args(args, dist.get_world_size())
    dp_rank = parallel_state.get_data_parallel_rank()
    gem_config = gem_config_from_args(args)
    seed_everything(args.seed)
    device = _comm_device()

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model, arch, config, meta = build_model(args, tokenizer, gem_config)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=args.use_distributed_optimizer),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=1e-8,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_scale_func = optimizer.scale_loss

    corpus = open_training_corpus(args, tokenizer)
    ntp_loader, cl_loader = build_loaders(args, corpus, tokenizer, gem_config, dp_rank=dp_rank, dp_size=dp_size)
    if cl_loader is not None and pp > 1:  # pipeline messages need one shape: fixed row count
        cl_loader.dataset.num_rows = contrastive_rows(args.contrastive_batch_size, args.seq_length, cl_loader.dataset.max_text_len)
    accum = ntp_loader.num_microbatches

    start_step = 0
    if args.load:
        tag = resolve_checkpoint(args.load, fallback=args.load_fallback, log=D.print_main)
        if tag is not None:
            state = load_checkpoint(model, optimizer, args.load, tag)
            start_step = int(state["step"])
            ntp_loader.load_state_dict(state["ntp_data"])
            if cl_loader is not None and state.get("contrastive_data"):
                cl_loader.load_state_dict(state["contrastive_data"])
    os.makedirs(args.save, exist_ok=True)
    if dist.get_rank() == 0:
        gem_config.save(args.save)
    end_step = args.train_iters if args.exit_after_iters is None else min(args.train_iters, args.exit_after_iters)
    is_main = dist.get_rank() == 0
    log = MetricsLogger(args.save, enabled=is_main, resume_step=start_step, progress_total=args.train_iters, progress=not args.no_progress)
    if is_main:
        print(
            f"[megatron-gem] {args.model}: megatron-core TP={tp} PP={pp} DP={dp_size} (distributed optimizer: "
            f"{args.use_distributed_optimizer}, SP: {config.sequence_parallel}, recompute: {config.recompute_granularity}), "
            f"accum={accum}, steps {start_step}->{end_step} (phase 2 from {args.gem_contrastive_from_step}), {len(corpus)} documents; "
            f"data: {data_summary(corpus, cl_loader)}",
            flush=True,
        )
    gather_keys = D.make_gather_keys(parallel_state.get_data_parallel_group())
    forward_backward = get_forward_backward_func()
    ntp_iter, cl_iter = iter(ntp_loader), (iter(cl_loader) if cl_loader is not None else None)
    ddp.train()
    dp_group = parallel_state.get_data_parallel_group()
    book = StepBookkeeping(
        args,
        log,
        stop,
        end_step,
        save=lambda done: save_checkpoint(
            model,
            optimizer,
            args.save,
            done,
            {"step": done, "ntp_data": ntp_loader.state_dict(), "contrastive_data": cl_loader.state_dict() if cl_loader is not None else None},
            meta,
            tokenizer,
            gem_config,
        ),
        export=lambda done: io.export_hf_from_model(
            model,
            arch,
            os.path.join(args.save, "hf"),
            hf_config=meta["hf_config"],
            vocab_size=meta["vocab_size"],
            tokenizer=tokenizer,
            gem_config=gem_config,
            extra={"step": done, "args": vars(args)},
        ),
        is_main=is_main,
    )
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        w_ntp, w_cl = loss_weights(step, gem_config)
        ntp_batches = [next(ntp_iter) for _ in range(accum)] if w_ntp > 0 else [None] * accum
        cl_batches = [next(cl_iter) for _ in range(accum)] if w_cl > 0 else [None] * accum
        micro = [join_rows(a, b, device) for a, b in zip(ntp_batches, cl_batches)]
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in ntp_batches if b is not None)
        global_tokens = int(D.all_reduce_sum(torch.tensor(local_tokens, device=device), group=dp_group)) if w_ntp > 0 else 0
        lr = lr_for_step(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = StepLoss(w_ntp=w_ntp, w_cl=w_cl, global_tokens=global_tokens, dp_size=dp_size, accum=accum, gather_keys=gather_keys)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(
            forward_step_func=step_loss.forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=accum,
            seq_length=args.seq_length,
            micro_batch_size=micro[0]["input_ids"].shape[0],
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        if not ok:  # megatron-core found inf/nan gradients and skipped the update
            grad_norm = float("nan")
        scale = float(model.logit_scale()) if model.post_process else None
        record = step_record(step, stats, w_ntp, w_cl, global_tokens, lr, grad_norm, time.perf_counter() - t0, dp_size, scale)
        local = [s["ntp_sum"] for s in stats] + [s["cl"] for s in stats]
        if book.after_step(step, record, local_losses=local, device=device):
            break
    log.close()
    return book.summary(tp=tp, pp=pp, dp_size=dp_size)


def main(argv=None) -> int:
    from .megatron_args import parse_megatron_args

    args = parse_megatron_args(argv)
    try:
        summary = train(args)
    except (ArgumentError, ModelLoadError, UnsupportedModelError, DataError) as e:
        print(f"train.py: error: {e}", flush=True)
        return 2
    except (NonFiniteError, CheckpointError, CheckpointWriteError) as e:
        D.print_main(f"train.py: error: {e}")  # every rank raised the same error
        return 1
    if dist.is_initialized() and dist.get_rank() == 0:
        print(f"[megatron-gem] done: {summary}", flush=True)
    from ..models.runtime import destroy

    destroy()
    return 0


if __name__ == "__main__":  # torchrun -m megatron_gem.training.megatron_engine ...
    import sys

    sys.exit(main())
