#!/usr/bin/env python
"""Convert GEM checkpoints between HF, megatron-core and DeepSpeed formats.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P
    python tools/convert_checkpoint.py megatron-to-hf --input DIR --output HF_DIR
    python tools/convert_checkpoint.py deepspeed-to-hf --input SAVE_DIR --model BASE_HF_DIR --output HF_DIR

The megatron output is megatron-core dist_checkpointing (torch_dist): it loads at any TP/PP.
T sets the vocabulary padding (a multiple of --make-vocab-size-divisible-by x T); T and P are
recorded in DIR/megatron_gem.json. megatron-to-hf drops the padding again and writes
safetensors with bit-equal weights (shards of --max-shard-size); it reads converted checkpoints
and every SAVE/global_stepN of train.py's megatron-core engine. deepspeed-to-hf reads every
checkpoint train.py's DeepSpeed engine writes (ZeRO-0 to 3, fp32 or bf16; summary mode gives the
adapter folder). Llama-family models only (Llama 2/3/3.1/3.2, Mistral); anything else is
refused. Runs in one process on CPU and streams tensor by tensor: peak memory is about one
layer in both directions, not the model. Loads only safetensors, torch.load(weights_only=True)
and, for the dist checkpoint's .metadata, a restricted unpickler (deepspeed-to-hf of ZeRO-1/2/3
excepted: DeepSpeed's zero_to_fp32 unpickles the optimizer states; convert checkpoints you trust).

--output must be new or empty; --overwrite-output-dir replaces an earlier output, and even then
only the files its manifest.json lists. Errors are one line on stderr: exit 2 for a wrong
argument or input, 1 for a failure during the work (a damaged checkpoint, a full disk); --debug
shows the traceback. See docs/megatron.md and docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.errors import InputError  # noqa: E402
from megatron_gem.common.outputs import add_overwrite_flag, check_apart, check_output_dir  # noqa: E402

PROG = "convert_checkpoint.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, input_help: str) -> None:
        s.add_argument("--input", required=True, help=input_help)
        s.add_argument("--output", required=True, help="output directory (new or empty; see --overwrite-output-dir)")
        add_overwrite_flag(s)
        add_debug_flag(s)

    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> megatron-core dist checkpoint")
    common(a, "HF checkpoint directory (safetensors)")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP the checkpoint is made for (sets the vocabulary padding; default 1)")
    a.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP the checkpoint is made for (recorded; default 1)")
    a.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x T (Megatron-LM's rule; default 128)"
    )
    b = sub.add_parser("megatron-to-hf", help="megatron-core dist checkpoint (from hf-to-megatron or training) -> HF")
    common(b, "megatron-core checkpoint directory (hf-to-megatron's output, or a train.py SAVE/global_stepN)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of the HF output, HF's spelling (default 5GB)")
    c = sub.add_parser("deepspeed-to-hf", help="a checkpoint of train.py's DeepSpeed engine (ZeRO-0..3, bf16, summary mode) -> HF")
    common(c, "the run's --save directory (holds 'latest' and global_stepN)")
    c.add_argument("--model", required=True, help="the HF checkpoint the run started from (config, tokenizer; summary mode: the base)")
    c.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the one named in 'latest')")
    return p


def check_paths(args) -> None:
    """Every path, before megatron-core or a model is touched: one line naming the flag."""
    from megatron_gem.common.model_paths import check_model_source

    src = args.input
    if os.path.lexists(src) and not os.path.exists(src):
        raise InputError(f"--input {src}: a symbolic link to nowhere (or a link loop)")
    if not os.path.exists(src):
        raise InputError(f"--input {src}: no such directory")
    if not os.path.isdir(src):
        raise InputError(f"--input {src}: is a file; expected a checkpoint directory")
    check_apart("--output", args.output, "--input", src)
    if args.command == "hf-to-megatron":
        check_model_source("--input", src, config=True, weights=True)
    elif args.command == "megatron-to-hf":
        from megatron_gem.mcore.checkpoint_io import META_NAME

        if not os.path.isfile(os.path.join(src, META_NAME)):
            hint = " (a --save directory: give one of its global_stepN)" if any(n.startswith("global_step") for n in os.listdir(src)) else ""
            raise InputError(f"--input {src}: no {META_NAME}; not a megatron-core checkpoint of megatron-gem{hint}")
    else:
        from megatron_gem.hf.deepspeed_checkpoint import checkpoint_tag_dir

        check_model_source("--model", args.model, config=True, tokenizer=True)
        checkpoint_tag_dir(src, args.tag)
    check_output_dir(args.output, "--output", overwrite=args.overwrite_output_dir)


def convert(args) -> None:
    check_paths(args)
    if args.command == "deepspeed-to-hf":
        from megatron_gem.hf.deepspeed_checkpoint import deepspeed_to_hf

        deepspeed_to_hf(args.input, args.output, model_dir=args.model, tag=args.tag, overwrite=args.overwrite_output_dir)
        return
    if args.command == "hf-to-megatron":  # refuse unsupported models before starting megatron-core
        from transformers import AutoConfig

        from megatron_gem.mcore.llama import arch_from_hf_config, check_parallel_sizes

        check_parallel_sizes(arch_from_hf_config(AutoConfig.from_pretrained(args.input)), args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    from megatron_gem.common.distributed import ensure_launcher_env

    ensure_launcher_env()  # a plain one-process run: private rendezvous port
    from megatron_gem.mcore import convert, runtime

    runtime.init_model_parallel(1, 1)
    try:
        if args.command == "hf-to-megatron":
            convert.hf_to_megatron(
                args.input,
                args.output,
                tp=args.tensor_model_parallel_size,
                pp=args.pipeline_model_parallel_size,
                divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite_output_dir,
            )
        else:
            convert.megatron_to_hf(args.input, args.output, max_shard_size=args.max_shard_size, overwrite=args.overwrite_output_dir)
    finally:
        runtime.destroy()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A library's ValueError here is about the input (an unsupported model, a mismatched file).
    return run_main(PROG, lambda: convert(args), debug=args.debug, input_errors=(ValueError, KeyError, pickle.UnpicklingError))


if __name__ == "__main__":
    sys.exit(main())
