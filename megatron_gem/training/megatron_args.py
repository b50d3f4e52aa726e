"""Command line of the megatron-core backend: train.py's flags plus Megatron-LM's parallelism
flags (same names). Selecting the backend: any of --tensor-model-parallel-size /
--pipeline-model-parallel-size on the command line (see ``wants_megatron``)."""

from __future__ import annotations

import argparse

from .args import ArgumentError, build_parser, validate_args

MEGATRON_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")


def wants_megatron(argv) -> bool:
    """True when the command line selects the megatron-core backend."""
    return any(a == f or a.startswith(f + "=") for a in argv for f in MEGATRON_FLAGS)


def build_megatron_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "train.py (megatron-core backend)"
    p.description = (
        "GEM post-training of a Llama-family model with megatron-core (tensor, pipeline and data "
        "parallel with the distributed optimizer). Launch with torchrun; selected by "
        "--tensor-model-parallel-size / --pipeline-model-parallel-size."
    )
    g = p.add_argument_group("megatron-core (Megatron-LM flag names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="shard norms/dropout activations along the sequence (needs TP > 1)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None, help="activation recomputation (full: whole layers; selective: core attention)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false", help="replicate optimizer states instead of sharding them over data-parallel ranks")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x TP")
    return p


def parse_megatron_args(argv=None):
    return build_megatron_parser().parse_args(argv)


def validate_megatron_args(args, world_size: int) -> int:
    """Validate everything (train.py's checks with the data-parallel size); returns dp size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp} must be >= 1")
    if world_size % (tp * pp):
        raise ArgumentError(f"{world_size} processes cannot be split into TP={tp} x PP={pp} (world size must be a multiple of {tp * pp})")
    if args.deepspeed_config is not None:
        raise ArgumentError("--deepspeed selects the DeepSpeed backend; it cannot be combined with --tensor/--pipeline-model-parallel-size")
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.gradient_checkpointing and args.recompute_granularity is None:
        args.recompute_granularity = "full"
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method applies to --recompute-granularity full only")
    if args.attention_backend == "flex":
        raise ArgumentError("--attention-backend flex has no backward on CPU and is for inference; use auto, sdpa or triton")
    dp = world_size // (tp * pp)
    validate_args(args, dp)
    return dp
