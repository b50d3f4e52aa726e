"""Training metrics: metrics.jsonl (one JSON object per logged step, and one per validation),
TensorBoard when installed, Weights & Biases when --wandb-project is given, and a progress bar
on rank 0 (with the last validation figures beside it)."""

from __future__ import annotations

import json
import os

from .args import ArgumentError


def start_wandb(config, save_dir: str, run_config: dict | None):
    """wandb.init with Megatron-LM's semantics: project, run name, files under --wandb-save-dir
    (default <--save>/wandb); the job config as the run's config."""
    try:
        import wandb
    except ImportError as e:  # args.py checks this before any work; a broken install lands here
        raise ArgumentError(f"--wandb-project {config.project}: wandb cannot be imported ({e}); pip install wandb") from e
    directory = config.save_dir or os.path.join(save_dir, "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(project=config.project, name=config.exp_name, dir=directory, config=run_config or {})


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


class MetricsLogger:
    def __init__(
        self,
        save_dir: str,
        *,
        enabled: bool,
        resume_step: int = 0,
        progress_total: int | None = None,
        progress: bool = True,
        wandb=None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        self.wandb = None
        self.valid_postfix: dict = {}
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(save_dir, "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self.tb = None
        if wandb is not None and wandb.project:
            self.wandb = start_wandb(wandb, save_dir, run_config)
        if progress and progress_total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=progress_total, initial=resume_step, desc="GEM train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged after the checkpoint it resumes from."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict, section: str = "train") -> None:
        """One metrics.jsonl line; the same figures to TensorBoard (``section/key``, a
        validation's ``valid_`` prefix dropped) and W&B (the metrics.jsonl keys)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = _numbers(record)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"{section}/{k.removeprefix('valid_')}", v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])
        if section == "valid":
            shown = (("val_ntp", "valid_ntp_loss"), ("val_cl", "valid_cl_loss"), ("val_top1", "valid_cl_top1"))
            self.valid_postfix = {name: f"{record[k]:.4f}" for name, k in shown if record.get(k) is not None}

    def tick(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix or self.valid_postfix:
                self.bar.set_postfix({**(postfix or {}), **self.valid_postfix}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
