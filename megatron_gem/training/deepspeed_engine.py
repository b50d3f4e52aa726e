"""GEM post-training with DeepSpeed (ZeRO-0/1/2/3; GPU with NCCL, CPU with gloo).

The loop per optimizer step: ``accum`` micro-batches, each ``engine.backward`` +
``engine.step`` (DeepSpeed steps the optimizer at the accumulation boundary). Phase 1 trains
mixed NTP on packed GEM rows; from --gem-contrastive-from-step, phase 2 trains InfoNCE on
the special-token embeddings (negatives from every data-parallel rank), plus (1 - alpha) NTP.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from ..common.manifest import CheckpointError
from ..data import DataError
from ..gem.losses import loss_weights
from . import distributed as D
from .args import ArgumentError, gem_config_from_args, validate_args
from .checkpoint import CheckpointWriteError, export_hf, load_engine_checkpoint, resolve_checkpoint, save_engine_checkpoint
from .data_setup import build_loaders, data_summary, open_training_corpus
from .ds_config import load_ds_config, zero_stage
from .guard import NonFiniteError
from .loop import StepBookkeeping
from .metrics import MetricsLogger
from .model import GEMModel, ModelLoadError, load_causal_lm, load_tokenizer, param_groups, prepare_gem_lm, zero3_gather
from .schedule import build_scheduler
from .step import MicroLoss, contrastive_micro_loss, count_trained_tokens, ntp_micro_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_optimizer(model, args, ds_config):
    """None when the DeepSpeed config has an optimizer section (DeepSpeed builds it, e.g. CPU
    Adam for offload); else fused Adam on GPU, torch AdamW on CPU."""
    if "optimizer" in ds_config:
        return None
    groups = param_groups(model, args.weight_decay)
    betas = (args.adam_beta1, args.adam_beta2)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=args.lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas)


def train(args) -> dict:
    """Run the whole job; returns a summary dict (rank 0's view)."""
    import deepspeed

    D.ensure_launcher_env()
    validate_args(args, int(os.environ["WORLD_SIZE"]))  # before any process group: bad flags fail fast
    D.init_deepspeed_distributed(args.distributed_timeout_minutes)
    stop = D.exit_signal_handler(args.exit_signal_handler)
    dp_rank, dp_size = D.rank(), D.world_size()
    gem_config = gem_config_from_args(args)
    seed_everything(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    from transformers import AutoConfig

    ds_config = load_ds_config(args.deepspeed_config, args, dp_size, AutoConfig.from_pretrained(args.model))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    lm, zero3_handle = load_causal_lm(args.model, dtype=dtype, ds_config=ds_config)
    prepare_gem_lm(
        lm,
        tokenizer,
        gem_config,
        backend=args.attention_backend,
        gradient_checkpointing=args.gradient_checkpointing,
        gather=zero3_gather(ds_config),
    )
    model = GEMModel(lm, gem_config)
    optimizer = build_optimizer(model, args, ds_config)
    if optimizer is None:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay), config=ds_config)
        scheduler = build_scheduler(optimizer, args)
        engine.lr_scheduler = scheduler  # so DeepSpeed steps and checkpoints it
    else:
        scheduler = build_scheduler(optimizer, args)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    corpus = open_training_corpus(args, tokenizer)
    ntp_loader, cl_loader = build_loaders(args, corpus, tokenizer, gem_config, dp_rank=dp_rank, dp_size=dp_size)
    accum = ntp_loader.num_microbatches

    start_step = 0
    if args.load:
        tag = resolve_checkpoint(args.load, fallback=args.load_fallback, log=D.print_main)
        if tag is not None:
            state = load_engine_checkpoint(engine, args.load, tag)
            start_step = int(state["step"])
            ntp_loader.load_state_dict(state["ntp_data"])
            if cl_loader is not None and state.get("contrastive_data"):
                cl_loader.load_state_dict(state["contrastive_data"])
    os.makedirs(args.save, exist_ok=True)
    if D.is_main():
        gem_config.save(args.save)
    end_step = args.train_iters if args.exit_after_iters is None else min(args.train_iters, args.exit_after_iters)
    log = MetricsLogger(args.save, enabled=D.is_main(), resume_step=start_step, progress_total=args.train_iters, progress=not args.no_progress)
    if D.is_main():
        print(
            f"[megatron-gem] {args.model}: ZeRO-{zero_stage(ds_config)}, dp={dp_size}, accum={accum}, "
            f"steps {start_step}->{end_step} (phase 2 from {args.gem_contrastive_from_step}), "
            f"{len(corpus)} documents; data: {data_summary(corpus, cl_loader)}",
            flush=True,
        )
    gather_keys = D.make_gather_keys()
    ntp_iter, cl_iter = iter(ntp_loader), (iter(cl_loader) if cl_loader is not None else None)
    engine.train()
    # DeepSpeed's plain fp32 engine clips but does not keep the norm; compute it ourselves there.
    reports_no_grad_norm = zero_stage(ds_config) == 0 and not args.bf16
    book = StepBookkeeping(
        args,
        log,
        stop,
        end_step,
        save=lambda done: save_engine_checkpoint(engine, args.save, done, _client_state(done, ntp_loader, cl_loader)),
        export=lambda done: export_hf(engine.module.lm, tokenizer, gem_config, os.path.join(args.save, "hf"), extra={"step": done, "args": vars(args)}),
        is_main=D.is_main(),
    )
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        w_ntp, w_cl = loss_weights(step, gem_config)
        ntp_batches = [to_device(next(ntp_iter), device) for _ in range(accum)] if w_ntp > 0 else []
        cl_batches = [to_device(next(cl_iter), device) for _ in range(accum)] if w_cl > 0 else []
        global_tokens = int(D.all_reduce_sum(count_trained_tokens(ntp_batches).to(device))) if ntp_batches else 0
        parts: list[MicroLoss] = []
        lr = optimizer.param_groups[0]["lr"]  # the LR this step uses
        own_norm = None
        for m in range(accum):
            loss = torch.zeros((), device=device)
            if ntp_batches:
                part = ntp_micro_loss(engine, ntp_batches[m], global_tokens=global_tokens, dp_size=dp_size, accum_steps=accum, weight=w_ntp)
                parts.append(part)
                loss = loss + part.loss
            if cl_batches:
                part = contrastive_micro_loss(engine, cl_batches[m], gather_keys=gather_keys, weight=w_cl)
                parts.append(part)
                loss = loss + part.loss
            engine.backward(loss)
            if m == accum - 1 and reports_no_grad_norm:
                own_norm = grad_norm_of(engine.module)
            engine.step()
        grad_norm = own_norm if reports_no_grad_norm else engine.get_global_grad_norm()
        record = _step_record(step, parts, w_ntp, w_cl, global_tokens, engine, lr, grad_norm, time.perf_counter() - t0, dp_size)
        local = [p.ntp_sum for p in parts] + [p.cl_loss for p in parts]
        if book.after_step(step, record, local_losses=local, device=device):
            break
    log.close()
    del zero3_handle
    return book.summary(zero_stage=zero_stage(ds_config), dp_size=dp_size)


def _client_state(done: int, ntp_loader, cl_loader) -> dict:
    """What a checkpoint needs beyond the engine's own state for an exact resume."""
    return {"step": done, "ntp_data": ntp_loader.state_dict(), "contrastive_data": cl_loader.state_dict() if cl_loader is not None else None}


@torch.no_grad()
def grad_norm_of(module) -> float:
    """L2 norm of all gradients (after DeepSpeed's data-parallel averaging at the boundary)."""
    sq = sum(float(p.grad.float().square().sum()) for p in module.parameters() if p.grad is not None)
    return sq**0.5


def _step_record(step, parts, w_ntp, w_cl, global_tokens, engine, lr, grad_norm, seconds, dp_size) -> dict:
    ntp_sum = float(D.all_reduce_sum(torch.tensor(sum(p.ntp_sum for p in parts), dtype=torch.float64)))
    cl_values = [p.cl_loss for p in parts if p.cl_loss is not None]
    cl = float(D.all_reduce_sum(torch.tensor(sum(cl_values) / len(cl_values), dtype=torch.float64))) / dp_size if cl_values else None
    ntp = ntp_sum / global_tokens if global_tokens else None
    tokens = float(D.all_reduce_sum(torch.tensor(sum(p.tokens for p in parts), dtype=torch.float64)))
    loss = (w_ntp * ntp if ntp is not None else 0.0) + (w_cl * cl if cl is not None else 0.0)
    return {
        "step": step + 1,
        "phase": 1 if w_cl == 0 else 2,
        "loss": loss,
        "ntp_loss": ntp,
        "cl_loss": cl,
        "lr": lr,
        "tokens_per_s": tokens / seconds,
        "logit_scale": read_logit_scale(engine.module),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "step_time_s": seconds,
    }


@torch.no_grad()
def read_logit_scale(model) -> float:
    param = model.logit_scale.log_scale
    if hasattr(param, "ds_id"):  # ZeRO-3: gather the (possibly partitioned) scalar
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return float(model.logit_scale())
    return float(model.logit_scale())


def main(argv=None) -> int:
    from .args import parse_args

    args = parse_args(argv)
    try:
        summary = train(args)
    except (ArgumentError, ModelLoadError, DataError) as e:  # user errors: one clear line
        print(f"train.py: error: {e}", flush=True)
        return 2
    except (NonFiniteError, CheckpointError, CheckpointWriteError) as e:
        # The run cannot go on. Every rank raised the same error (they agree collectively), so
        # one of them says it.
        D.print_main(f"train.py: error: {e}")
        return 1
    if D.is_main():
        print(f"[megatron-gem] done: {summary}", flush=True)
    return 0
