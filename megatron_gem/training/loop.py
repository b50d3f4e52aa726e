"""What every engine does after an optimizer step: metrics, progress, checkpoints, HF export,
pre-emption, and the non-finite check (guard.py) before any of them. The engines differ in how
a step is computed, not in this bookkeeping."""

from __future__ import annotations

from typing import Callable

from .guard import NonFiniteError, check_step


class StepBookkeeping:
    """``after_step(step, record)`` returns True when the loop must stop (pre-empted).

    ``save(done)`` writes an engine checkpoint of ``done`` steps; ``export(done)`` the HF export.
    Checkpoints at every --save-interval and at the last step; export at every
    --hf-export-interval and at --train-iters; a received exit signal ends the run after the
    current step with a checkpoint. ``validate(done)`` (None: no validation data) returns the
    validation record; it runs every --eval-interval steps and after the last step, not on
    pre-emption (the job must exit quickly).
    """

    def __init__(
        self,
        job,
        log,
        stop,
        end_step: int,
        *,
        save: Callable[[int], None],
        export: Callable[[int], None],
        is_main: bool,
        validate: Callable[[int], dict] | None = None,
    ):
        self.job, self.log, self.stop = job, log, stop
        self.end_step = end_step
        self.save, self.export, self.is_main, self.validate = save, export, is_main, validate
        self.first_loss = self.last_loss = None
        self.last_valid = None
        self.preempted = False

    def after_step(self, step: int, record: dict, local_losses=()) -> bool:
        """``local_losses``: this rank's own loss values of the step (for the non-finite check's
        message). Collective: call on every rank."""
        ck, run = self.job.checkpoint, self.job.run
        if run.check_for_nan_in_loss_and_grad:
            try:
                check_step(record, local_losses, save_dir=ck.save)
            except NonFiniteError:
                self.log.log(record)  # the bad step's figures, for the post-mortem
                raise
        if self.first_loss is None:
            self.first_loss = record["loss"]
        self.last_loss = record["loss"]
        done = step + 1
        if run.exit_signal_handler and self.stop.should_exit():
            self.preempted, self.end_step = True, done
        if done % run.log_interval == 0 or done == self.end_step:
            self.log.log(record)
        if self.validate is not None and not self.preempted and (done % self.job.validation.eval_interval == 0 or done == self.end_step):
            self.last_valid = self.validate(done)
            self.log.log(self.last_valid, section="valid")
        self.log.tick({"loss": f"{record['loss']:.4f}", "phase": record["phase"]})
        if done % ck.save_interval == 0 or done == self.end_step:
            self.save(done)
        if (ck.hf_export_interval and done % ck.hf_export_interval == 0) or done == self.job.optimizer.train_iters:
            self.export(done)
        if self.preempted and self.is_main:
            print(f"[megatron-gem] {self.stop.received or 'signal'}: saved step {done} to {ck.save}; exiting for requeue", flush=True)
        return self.preempted

    def final_report(self, **extra) -> dict:
        """The run's result (what train() returns and main prints at the end): losses, the last step,
        pre-emption, the last validation, and ``extra`` (the engine's report, the teacher cache's counts)."""
        return {
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "preempted": self.preempted,
            "step": self.end_step,
            "save": self.job.checkpoint.save,
            **({"valid": {k: v for k, v in self.last_valid.items() if k != "step"}} if self.last_valid else {}),
            **extra,
        }
