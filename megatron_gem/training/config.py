"""What a training run is, as typed nested dataclasses (torchtitan's job config is the model).

train.py's command line (args.py) is turned into a ``JobConfig`` once, at the entry point,
after every check; the trainer, both engines, the data set-up, the schedule and the
bookkeeping read this, never the argparse namespace. The GEM method's own settings are the
method's ``GEMConfig`` (gem/config.py), nested as ``job.gem``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..gem.config import GEMConfig


@dataclass
class ModelConfig:
    path: str  # HF checkpoint directory or repo id; for megatron-core also a converted checkpoint
    tokenizer: str | None = None  # default: path
    attention_backend: str = "auto"  # auto | sdpa | flex | triton
    bf16: bool = False
    gradient_checkpointing: bool = False
    # summary mode, phase 2: no-grad text + summary step (gem/summary_step.py); False: full rows
    summary_fast_path: bool = True

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass
class DataConfig:
    paths: list[str]  # --data: files, a Megatron .bin/.idx prefix, or hf:NAME (empty with --data-path)
    text_field: str = "text"
    skip_bad_records: bool = False
    pairs: list[str] | None = None  # --contrastive-data (None: self-supervised positives)
    query_field: str = "query"
    positive_field: str = "positive"
    blend_paths: list[str] | None = None  # --data-path: the sources of a blend (then paths is empty)
    blend_weights: list[float] | None = None  # their weights (None: in proportion to size)
    negative_field: str | None = None  # --contrastive-negative-field: hard negatives of each pair
    negatives_required: bool = False  # a pair record without hard negatives is a bad record
    cache_path: str | None = None  # --data-cache-path: where text input is tokenised once (None: <--save>/data_cache)
    teacher: str | None = None  # --contrastive-teacher: a sentence-transformers folder phase 2 distils (None: no teacher)
    teacher_cache: str | None = None  # --contrastive-teacher-cache: the teacher's embeddings kept on disk (None: not kept)

    @property
    def on_bad(self) -> str:
        return "skip" if self.skip_bad_records else "error"


@dataclass
class BatchConfig:
    seq_length: int = 512
    micro_batch_size: int = 1
    global_batch_size: int = 1  # rows per optimizer step over all data-parallel ranks
    contrastive_batch_size: int = 8  # texts per contrastive micro-batch per rank
    contrastive_max_length: int = 512
    data_parallel_size: int = 1
    contrastive_micro_batch_size: int | None = None  # GradCache chunk (anchors per graph); None: no chunking

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)


@dataclass
class OptimizerConfig:
    train_iters: int = 1
    lr: float = 1e-4  # phase 1 peak
    contrastive_lr: float = 1e-5  # phase 2 peak
    min_lr_ratio: float = 0.0
    lr_warmup_fraction: float = 0.01
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234


@dataclass
class CheckpointConfig:
    save: str = "runs/gem"
    load: str | None = None
    load_fallback: bool = False
    save_interval: int = 1000
    hf_export_interval: int = 0
    exit_after_iters: int | None = None
    hf_export_self_contained: bool = False  # summary mode: the export carries the base (hf/base/)
    save_total_limit: int | None = None  # keep the newest N checkpoints (None: all)
    overwrite: bool = False  # --overwrite-output-dir: a new run in a --save holding another run's checkpoints


@dataclass
class RunConfig:
    log_interval: int = 10
    progress: bool = True
    exit_signal_handler: bool = False
    distributed_timeout_minutes: int = 10
    check_for_nan_in_loss_and_grad: bool = True


@dataclass
class ParallelConfig:
    """How the work is split. DeepSpeed: data parallel with a ZeRO stage from ``deepspeed_config``;
    megatron-core: the tensor / pipeline / data-parallel flags (Megatron-LM names)."""

    engine: str = "deepspeed"  # deepspeed | megatron
    deepspeed_config: str | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    use_distributed_optimizer: bool = True
    make_vocab_size_divisible_by: int = 128


@dataclass
class ValidationConfig:
    """Validation during training (Megatron-LM's flags): every ``eval_interval`` steps and at the
    end, ``eval_iters`` global batches of held-out data. Held-out documents come from ``split``
    (train, valid, test weights over --data) or ``valid_data``; held-out pairs from
    ``valid_contrastive_data`` or, with --contrastive-data and ``split``, the pairs' valid part."""

    split: tuple[float, float, float] | None = None  # normalised weights; None: all of --data trains
    valid_data: list[str] | None = None
    valid_contrastive_data: list[str] | None = None
    eval_interval: int = 1000
    eval_iters: int = 100

    @property
    def has_valid_documents(self) -> bool:
        return bool(self.valid_data) or (self.split is not None and self.split[1] > 0)


@dataclass
class WandbConfig:
    """Weights & Biases (Megatron-LM's flags); off when ``project`` is None. Rank 0 logs."""

    project: str | None = None
    exp_name: str | None = None
    save_dir: str | None = None  # default: <--save>/wandb


@dataclass
class JobConfig:
    model: ModelConfig
    data: DataConfig
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    gem: GEMConfig = field(default_factory=GEMConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def end_step(self) -> int:
        """The step this invocation stops after (--exit-after-iters cuts a run short)."""
        c, t = self.checkpoint.exit_after_iters, self.optimizer.train_iters
        return t if c is None else min(t, c)

    @property
    def has_phase_two(self) -> bool:
        return self.gem.contrastive_from_step < self.optimizer.train_iters

    @property
    def validates(self) -> bool:
        return self.validation.eval_iters > 0 and self.validation.has_valid_documents

    def to_dict(self) -> dict:
        """Plain JSON-able dict (training_info.json of the exports)."""
        return dataclasses.asdict(self)
