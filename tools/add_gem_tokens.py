#!/usr/bin/env python
"""Add the K GEM summary tokens to an HF checkpoint (before training, or for any engine).

    python tools/add_gem_tokens.py --input HF_DIR --output OUT_DIR [--num-special-tokens K]

New embedding rows (and LM-head rows when untied) start as the mean of the existing rows
(as megatron_gem.gem.tokens.add_gem_tokens does on a live model). Streams tensor by tensor, so
an 8B checkpoint never sits in memory. Writes safetensors (shards of --max-shard-size), the
tokenizer with the tokens and gem_config.json with their ids; the output appears only when
complete (built beside OUT_DIR, then renamed). OUT_DIR must be new or empty unless
--overwrite-output-dir is given (then only the files its manifest.json lists are replaced). A
checkpoint that already carries the tokens is copied unchanged. Errors are one line on stderr
(exit 2: the input, 1: the work); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.outputs import add_overwrite_flag, check_apart, check_output_dir  # noqa: E402

PROG = "add_gem_tokens.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="HF checkpoint directory (safetensors + tokenizer)")
    p.add_argument("--output", required=True, help="output directory (new or empty; see --overwrite-output-dir)")
    p.add_argument("--num-special-tokens", type=int, default=None, help="K (default: the input's gem_config.json, else 1)")
    p.add_argument("--special-token-template", default=None, help="token name template with {i} (default <|gem_{i}|>)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of the output, HF's spelling (default 5GB)")
    add_overwrite_flag(p)
    add_debug_flag(p)
    return p


def add_tokens(args) -> None:
    from megatron_gem.common.errors import InputError
    from megatron_gem.common.model_paths import check_model_source
    from megatron_gem.gem.config import CONFIG_NAME, GEMConfig, GEMConfigError
    from megatron_gem.mcore.convert import add_gem_tokens_to_hf_dir

    check_model_source("--input", args.input, config=True, tokenizer=True, weights=True)
    check_apart("--output", args.output, "--input", args.input)
    check_output_dir(args.output, "--output", overwrite=args.overwrite_output_dir)
    if os.path.isfile(os.path.join(args.input, CONFIG_NAME)):
        config = GEMConfig.load(args.input)
        if args.num_special_tokens not in (None, config.num_special_tokens):
            raise InputError(f"--num-special-tokens {args.num_special_tokens} contradicts {args.input}/{CONFIG_NAME} (K={config.num_special_tokens})")
    else:
        kw = {}
        if args.num_special_tokens is not None:
            kw["num_special_tokens"] = args.num_special_tokens
        if args.special_token_template is not None:
            kw["special_token_template"] = args.special_token_template
        try:
            config = GEMConfig(**kw)
        except GEMConfigError as e:
            flag = {"num_special_tokens": "--num-special-tokens", "special_token_template": "--special-token-template"}.get(e.field)
            raise InputError(f"{flag} {e.value}: {e.why}" if flag else str(e)) from None
    add_gem_tokens_to_hf_dir(args.input, args.output, config, max_shard_size=args.max_shard_size, overwrite=args.overwrite_output_dir)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: add_tokens(args), debug=args.debug, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
