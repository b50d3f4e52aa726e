#!/usr/bin/env python
"""Add the K GEM summary tokens to an HF checkpoint (before training, or for any engine).

    python tools/add_gem_tokens.py --input HF_DIR --output OUT_DIR [--num-special-tokens K]

New embedding rows (and LM-head rows when untied) start as the mean of the existing rows
(as megatron_gem.gem.tokens.add_gem_tokens does on a live model). Streams tensor by tensor, so
an 8B checkpoint never sits in memory. Writes safetensors (shards of --max-shard-size), the
tokenizer with the tokens and gem_config.json with their ids; the output appears only when
complete (written to OUT_DIR.tmp, then renamed). A checkpoint that already carries the tokens
is copied unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="add_gem_tokens.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="HF checkpoint directory (safetensors + tokenizer)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-special-tokens", type=int, default=None, help="K (default: the input's gem_config.json, else 1)")
    p.add_argument("--special-token-template", default=None, help="token name template with {i} (default <|gem_{i}|>)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of the output, HF's spelling (default 5GB)")
    args = p.parse_args(argv)
    from megatron_gem.gem.config import CONFIG_NAME, GEMConfig
    from megatron_gem.mcore.convert import add_gem_tokens_to_hf_dir

    try:
        if os.path.isfile(os.path.join(args.input, CONFIG_NAME)):
            config = GEMConfig.load(args.input)
            if args.num_special_tokens not in (None, config.num_special_tokens):
                raise ValueError(f"--num-special-tokens {args.num_special_tokens} contradicts {args.input}/{CONFIG_NAME} (K={config.num_special_tokens})")
        else:
            kw = {}
            if args.num_special_tokens is not None:
                kw["num_special_tokens"] = args.num_special_tokens
            if args.special_token_template is not None:
                kw["special_token_template"] = args.special_token_template
            config = GEMConfig(**kw)
        add_gem_tokens_to_hf_dir(args.input, args.output, config, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"add_gem_tokens.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
