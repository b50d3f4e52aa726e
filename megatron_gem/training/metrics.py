"""Training metrics: metrics.jsonl (one JSON object per logged step), TensorBoard when
installed, and a progress bar on rank 0."""

from __future__ import annotations

import json
import os


class MetricsLogger:
    def __init__(self, save_dir: str, *, enabled: bool, resume_step: int = 0, progress_total: int | None = None, progress: bool = True):
        self.enabled = enabled
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(save_dir, "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self.tb = None
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

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def tick(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
