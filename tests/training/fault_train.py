#!/usr/bin/env python
"""train.py with one injected fault, for the reliability tests (never used in production).

MG_FAULT selects it:
    nan@K:R            rank R's loss of step K (1-based, as in metrics.jsonl) is NaN
    enospc@K:R:NAME    rank R's write of a file whose name contains NAME, while saving
                       global_stepK, fails with ENOSPC (No space left on device)
    signal@K:R         rank R sends itself SIGUSR1 as step K starts (a pre-emption notice, as
                       SLURM's --signal gives; with --exit-signal-handler the run saves step K
                       and exits 0)

The patches go on the module attributes the engines call at run time; then train.py runs as
``__main__`` exactly as a user launches it (deepspeed / torchrun / python).
"""

import errno
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

kind, spec = os.environ["MG_FAULT"].split("@")
fields = spec.split(":")
STEP, RANK = int(fields[0]), int(fields[1])
ME = int(os.environ.get("RANK", "0"))
current = {"step": -1}  # 0-based index of the step being computed


def _track_steps():
    from megatron_gem.training import run as training_run

    original = training_run.loss_weights

    def loss_weights(step, config):
        current["step"] = step
        return original(step, config)

    training_run.loss_weights = loss_weights


def _poisoned() -> bool:
    return ME == RANK and current["step"] + 1 == STEP


_track_steps()
if kind == "nan":
    # Both engines compose a micro-batch's loss with gem.losses.micro_batch_loss (bound by name
    # in training.step for DeepSpeed, in mcore.loss for megatron-core): poison its NTP part.
    from megatron_gem.gem import losses
    from megatron_gem.mcore import loss as mcore_loss
    from megatron_gem.training import step

    micro_batch_loss = losses.micro_batch_loss

    def poisoned_micro_batch_loss(**kwargs):
        out = micro_batch_loss(**kwargs)
        if _poisoned() and out.ntp_sum is not None:
            out.total = out.total * float("nan")
            out.ntp_sum = out.ntp_sum * float("nan")
        return out

    step.micro_batch_loss = poisoned_micro_batch_loss
    mcore_loss.micro_batch_loss = poisoned_micro_batch_loss
elif kind == "enospc":
    NAME = fields[2]
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        path = str(f)
        if ME == RANK and f"global_step{STEP}" in path and NAME in os.path.basename(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return save(obj, f, *args, **kwargs)

    torch.save = failing_save
elif kind == "signal":
    import signal

    from megatron_gem.training import run as training_run

    weights = training_run.loss_weights  # _track_steps' wrapper: current["step"] is set inside it

    def signalling_loss_weights(step, config):
        out = weights(step, config)
        if _poisoned():
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    training_run.loss_weights = signalling_loss_weights
else:
    raise SystemExit(f"fault_train.py: unknown MG_FAULT kind {kind!r}")

sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
