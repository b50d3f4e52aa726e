"""The one training run both engines share (torchtitan's trainer is the model): seeding, data,
resume, the step loop with its two GEM phases, metrics, checkpoint cadence, export,
pre-emption and the non-finite check live here, once. An engine supplies only what differs
with the parallelism: building the model and optimizer, one optimizer step, and its own
checkpoint files (see ``Engine``). A new training feature goes here (or into the shared pieces
it calls), not into an engine.

One step: the loss weights of the step (gem.losses.loss_weights) pick the phase; the trainer
draws ``accum`` NTP and/or contrastive micro-batches per rank from the loaders, counts the NTP
targets of the global batch, and hands them to ``engine.train_step``; the StepOutput becomes the
metrics.jsonl record (step.step_record), and StepBookkeeping logs, checks, saves and exports.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..common import distributed as D
from ..distill import Teacher, embed_batch
from ..gem.losses import loss_weights
from ..gem.tokens import tokenizer_with_gem_tokens
from ..hf.model import check_gem_tokens, load_tokenizer
from .checkpoint import (
    LATEST,
    agree_on_write,
    clear_old_checkpoint,
    commit_checkpoint,
    resolve_checkpoint,
    rng_state,
    rotate_checkpoints,
    set_rng_state,
    tag_for,
)
from .config import JobConfig
from .data_setup import (
    build_loaders,
    build_validation_loaders,
    cache_report,
    data_cache_dir,
    data_report,
    open_contrastive_pairs,
    open_training_corpus,
    open_validation_pairs,
    split_training_corpus,
)
from .loop import StepBookkeeping
from .metrics import MetricsLogger
from .process_setup import exit_signal_handler
from .step import StepOutput, count_trained_tokens, step_record
from .validation import Validator


class Engine:
    """The parallelism-specific hooks of a run. Attributes set by ``init_distributed``:
    ``dp_rank``, ``dp_size``, ``dp_group`` (None: the whole world) and ``device``."""

    name = "engine"
    dp_rank: int = 0
    dp_size: int = 1
    dp_group = None
    device = torch.device("cpu")
    # Exceptions a failed checkpoint write may raise besides OSError.
    save_errors: tuple = ()

    def init_distributed(self, job: JobConfig) -> None:
        raise NotImplementedError

    def build(self, job: JobConfig, tokenizer) -> None:
        """The model with its weights and GEM tokens, the optimizer and the LR schedule."""
        raise NotImplementedError

    def adapt_loaders(self, job: JobConfig, ntp_loader, contrastive_loader) -> None:
        """Engine-specific loader settings (megatron-core's pipeline needs fixed row counts)."""

    def train_step(self, step: int, *, w_ntp: float, w_cl: float, ntp_batches: list, cl_batches: list, global_tokens: int) -> StepOutput:
        raise NotImplementedError

    def eval_step(self, ntp_batches: list, cl_batches: list) -> tuple[list, bool]:
        """Forward only, no gradient, of equally many NTP and contrastive micro-batches:
        (one validation.EvalParts per micro-batch on ranks that hold outputs, [] elsewhere;
        whether this rank's figures count). The model is back in train mode after. Collective."""
        raise NotImplementedError

    def save(self, save_dir: str, tag: str, state: dict) -> None:
        """Write this rank's files of checkpoint ``save_dir/tag`` (``state``: what the trainer
        needs back on resume). Collective."""
        raise NotImplementedError

    def load(self, load_dir: str, tag: str) -> dict:
        """Load checkpoint ``load_dir/tag`` (already verified); returns the saved ``state``."""
        raise NotImplementedError

    def export_hf(self, out_dir: str, extra: dict) -> None:
        """The HF export (with gem_config.json and manifest.json). Collective."""
        raise NotImplementedError

    def describe(self) -> str:
        """The engine's part of the start-up banner."""
        return self.name

    def report(self) -> dict:
        """The engine's figures for the run's final report (its parallel layout)."""
        return {}

    def close(self) -> None:
        """End of the run (before the final report is printed)."""

    def shutdown(self) -> None:
        """After the summary, and on the error paths: tear down the process groups. A process
        that exits with a live gloo group can abort at interpreter finalisation ("terminate
        called without an active exception": gloo's worker threads still hold work objects
        whose tensors need the GIL), which fails a run that had finished."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(engine: Engine, save_dir: str, step: int, state: dict, *, keep: int | None = None) -> str:
    """Every rank writes (engine files + its RNG state); the ranks agree on write errors;
    then the manifest and ``latest`` (checkpoint.commit_checkpoint); then, with ``keep``
    (--save-total-limit), rank 0 deletes the checkpoints older than the newest ``keep``
    (checkpoint.rotate_checkpoints) while the others wait. Collective."""
    tag = tag_for(step)
    path = os.path.join(save_dir, tag)
    error = None
    # Saved before (a resumed or overwriting run): only what its manifest lists goes. Rank 0's
    # view decides for all (node-local disks may differ).
    if D.all_gather_object(os.path.isdir(path) if D.is_main() else None)[0]:
        if D.is_main():
            try:
                clear_old_checkpoint(path)
            except OSError as e:
                error = e
        agree_on_write(path, error)
    try:
        engine.save(save_dir, tag, state)
        torch.save(rng_state(), os.path.join(path, f"rng_state_rank{D.rank()}.pt"))
    except (OSError, *engine.save_errors) as e:
        error = e
    agree_on_write(path, error, partial=path)
    commit_checkpoint(save_dir, tag, step=step, engine=engine.name)
    if keep is not None:
        if D.is_main():
            rotate_checkpoints(save_dir, keep, newest=tag, engine=engine.name, log=D.print_main)
        D.barrier()
    return tag


def resume(engine: Engine, job: JobConfig, ntp_loader, cl_loader) -> int:
    """The step to start from: 0, or the step of the verified checkpoint --load names (model,
    optimizer, RNG and data-loader states restored)."""
    ck = job.checkpoint
    if not ck.load:
        return 0
    tag = resolve_checkpoint(ck.load, fallback=ck.load_fallback, log=D.print_main)
    if tag is None:
        return 0
    state = engine.load(ck.load, tag)
    rng_path = os.path.join(ck.load, tag, f"rng_state_rank{D.rank()}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))  # our own file, verified by the manifest
    ntp_loader.load_state_dict(state["ntp_data"])
    if cl_loader is not None and state.get("contrastive_data"):
        cl_loader.load_state_dict(state["contrastive_data"])
    return int(state["step"])


def open_teacher(job: JobConfig, device) -> Teacher | None:
    """The frozen teacher of phase 2 (--contrastive-teacher) on the engine's device, with its
    embedding cache (--contrastive-teacher-cache); None without one or without a phase 2. Held
    here, by the run: never an attribute of the model, so no engine, optimizer, checkpoint or
    export ever sees it."""
    if job.data.teacher is None or not job.has_phase_two:
        return None
    return Teacher.from_pretrained(job.data.teacher, device=device, cache_dir=job.data.teacher_cache)


def describe_teacher(teacher: Teacher, job: JobConfig) -> str:
    """The start-up line of the teacher."""
    g = job.gem
    share = "the teacher alone" if g.teacher_weight >= 1 else f"{g.teacher_weight:g} x teacher + {1 - g.teacher_weight:g} x InfoNCE"
    cache = f"cache {teacher.cache.dir} ({len(teacher.cache)} texts)" if teacher.cache is not None else "no cache"
    return (
        f"teacher: {teacher.path} ({teacher.digest[:19]}, dim {teacher.dim}); contrastive loss: {share}, teacher temperature {g.teacher_temperature:g}; {cache}"
    )


def train(job: JobConfig, engine: Engine) -> dict:
    """Run the whole job; returns a summary dict (rank 0's view)."""
    engine.init_distributed(job)
    stop = exit_signal_handler(job.run.exit_signal_handler)
    seed_everything(job.optimizer.seed)
    tokenizer = load_tokenizer(job.model.tokenizer_path, "--tokenizer" if job.model.tokenizer else "--model")
    check_gem_tokens(tokenizer, job.gem)  # before the model loads: the tokens the flags ask for exist

    # The data is read (text tokenised into its cache) before the model loads: a malformed record
    # fails in seconds, not after minutes of loading weights. It is read with the tokenizer the
    # engine leaves once it has added the GEM tokens (checked equal below).
    data_tokenizer = tokenizer_with_gem_tokens(tokenizer, job.gem)
    corpus = open_training_corpus(job.data, data_tokenizer, cache_dir=data_cache_dir(job))
    cache_text = cache_report(corpus)
    corpus, valid_corpus, split_note = split_training_corpus(job, corpus, data_tokenizer)
    pairs = open_contrastive_pairs(job.data, data_tokenizer, job.gem.query_prompt) if job.has_phase_two and job.data.pairs else None
    valid_pairs = open_validation_pairs(job, data_tokenizer) if job.validates else None

    engine.build(job, tokenizer)
    if data_tokenizer is not tokenizer and data_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RuntimeError("the engine added the GEM tokens under other ids than tokenizer_with_gem_tokens: the data was tokenised for another vocabulary")
    ntp_loader, cl_loader = build_loaders(job, corpus, tokenizer, dp_rank=engine.dp_rank, dp_size=engine.dp_size, pairs=pairs)
    engine.adapt_loaders(job, ntp_loader, cl_loader)
    validator, valid_text = None, "none"
    if job.validates:
        v_ntp, v_cl, v_source = build_validation_loaders(job, valid_corpus, tokenizer, dp_rank=engine.dp_rank, dp_size=engine.dp_size, valid_pairs=valid_pairs)
        engine.adapt_loaders(job, v_ntp, v_cl)
        validator = Validator(engine, v_ntp, v_cl, eval_iters=job.validation.eval_iters)
        v = job.validation
        valid_text = (
            f"{split_note}\n{len(valid_corpus)} documents, every {v.eval_interval} steps and at the end, {v.eval_iters} global batches; contrastive: {v_source}"
        )
    accum = ntp_loader.num_microbatches
    teacher = open_teacher(job, engine.device)
    start_step = resume(engine, job, ntp_loader, cl_loader)

    ck = job.checkpoint
    os.makedirs(ck.save, exist_ok=True)
    if D.is_main():
        if ck.overwrite and start_step == 0 and os.path.isfile(os.path.join(ck.save, LATEST)):
            # --overwrite-output-dir: the earlier run no longer resumes from here by default
            os.remove(os.path.join(ck.save, LATEST))
        job.gem.save(ck.save)
    end_step = job.end_step
    log = MetricsLogger(
        ck.save,
        enabled=D.is_main(),
        resume_step=start_step,
        progress_total=job.optimizer.train_iters,
        progress=job.run.progress,
        wandb=job.wandb,
        run_config=job.to_dict(),
    )
    D.print_main(
        f"[megatron-gem] {job.model.path}: {engine.describe()}, accum={accum}, steps {start_step}->{end_step} "
        f"(phase 2 from {job.gem.contrastive_from_step}), {len(corpus)} documents; data: {data_report(corpus, cl_loader, ntp_loader)}{cache_text}\nvalidation: {valid_text}"
        + (f"\n{describe_teacher(teacher, job)}" if teacher is not None else "")
    )

    def state(done: int) -> dict:
        return {"step": done, "ntp_data": ntp_loader.state_dict(), "contrastive_data": cl_loader.state_dict() if cl_loader is not None else None}

    book = StepBookkeeping(
        job,
        log,
        stop,
        end_step,
        save=lambda done: save_checkpoint(engine, ck.save, done, state(done), keep=ck.save_total_limit),
        export=lambda done: engine.export_hf(os.path.join(ck.save, "hf"), {"step": done, "config": job.to_dict()}),
        is_main=D.is_main(),
        validate=validator,
    )
    ntp_iter, cl_iter = iter(ntp_loader), (iter(cl_loader) if cl_loader is not None else None)
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        w_ntp, w_cl = loss_weights(step, job.gem)
        ntp_batches = [next(ntp_iter) for _ in range(accum)] if w_ntp > 0 else []
        cl_batches = [next(cl_iter) for _ in range(accum)] if w_cl > 0 else []
        if teacher is not None:
            for batch in cl_batches:
                embed_batch(teacher, batch)  # the teacher's rows of the same texts, once per step, no gradient
        global_tokens = int(D.all_reduce_sum(count_trained_tokens(ntp_batches), group=engine.dp_group)) if ntp_batches else 0
        out = engine.train_step(step, w_ntp=w_ntp, w_cl=w_cl, ntp_batches=ntp_batches, cl_batches=cl_batches, global_tokens=global_tokens)
        record = step_record(step, out, w_ntp=w_ntp, w_cl=w_cl, global_tokens=global_tokens, seconds=time.perf_counter() - t0)
        if book.after_step(step, record, local_losses=out.local_losses):
            break
    log.close()
    engine.close()
    extra = {"teacher_texts_cached": teacher.hits, "teacher_texts_computed": teacher.misses} if teacher is not None else {}
    return book.final_report(**engine.report(), **extra)
