#!/usr/bin/env python
"""Convert GEM checkpoints between HF, megatron-core and DeepSpeed formats.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P
    python tools/convert_checkpoint.py megatron-to-hf --input DIR --output HF_DIR
    python tools/convert_checkpoint.py deepspeed-to-hf --input SAVE_DIR --model BASE_HF_DIR --output HF_DIR

The megatron output is megatron-core dist_checkpointing (torch_dist): it loads at any TP/PP.
T sets the vocabulary padding (a multiple of --make-vocab-size-divisible-by x T); T and P are
recorded in DIR/megatron_gem.json. megatron-to-hf drops the padding again and writes
safetensors with bit-equal weights (shards of --max-shard-size). Llama-family models only
(Llama 2/3/3.1/3.2, Mistral); anything else is refused. Runs in one process on CPU and streams
tensor by tensor: peak memory is about one layer in both directions, not the model. Loads only safetensors, torch.load(weights_only=True)
and, for the dist checkpoint's .metadata, a restricted unpickler. See docs/megatron.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> megatron-core dist checkpoint")
    a.add_argument("--input", required=True, help="HF checkpoint directory (safetensors)")
    a.add_argument("--output", required=True)
    a.add_argument("--tensor-model-parallel-size", type=int, default=1)
    a.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x T (Megatron-LM's rule)")
    b = sub.add_parser("megatron-to-hf", help="megatron-core dist checkpoint (from hf-to-megatron or training) -> HF")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of the HF output, HF's spelling (default 5GB)")
    c = sub.add_parser("deepspeed-to-hf", help="ZeRO checkpoint of the DeepSpeed GEM path -> HF (DeepSpeed's zero_to_fp32)")
    c.add_argument("--input", required=True, help="the run's --save directory (holds 'latest') or a tag directory's parent")
    c.add_argument("--model", required=True, help="the HF checkpoint the run started from (config, tokenizer)")
    c.add_argument("--output", required=True)
    c.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.input):
        print(f"convert_checkpoint.py: error: --input {args.input}: no such directory", file=sys.stderr)
        return 2
    from megatron_gem.mcore.llama import UnsupportedModelError

    try:
        if args.command == "deepspeed-to-hf":
            from megatron_gem.mcore.convert import deepspeed_to_hf

            deepspeed_to_hf(args.input, args.output, model_dir=args.model, tag=args.tag)
            return 0
        if args.command == "hf-to-megatron":  # refuse unsupported models before starting megatron-core
            from transformers import AutoConfig

            from megatron_gem.mcore.llama import arch_from_hf_config, check_parallel_sizes

            check_parallel_sizes(
                arch_from_hf_config(AutoConfig.from_pretrained(args.input)), args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            )
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
                )
            else:
                convert.megatron_to_hf(args.input, args.output, max_shard_size=args.max_shard_size)
        finally:
            runtime.destroy()
    except (UnsupportedModelError, FileNotFoundError, ValueError, pickle.UnpicklingError) as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
