#!/usr/bin/env python
"""Tokenise text files into a Megatron indexed dataset (.bin/.idx), as Megatron users expect.

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \
        --tokenizer path/to/hf_model [--json-keys text] [--append-eod] [--workers 4]

Writes ``{output-prefix}_{json-key}_document.bin/.idx`` with megatron-core's
IndexedDatasetBuilder (one sequence per document), shows a progress bar and ends with a
summary: documents read, skipped (by reason), tokens. Structural problems (malformed JSON, a
missing text field, invalid UTF-8, ...) stop with the file and line named, unless
--skip-bad-records is given. GEM layouts are not baked in: they are drawn per epoch at load time.
Existing output files are refused unless --overwrite-output-dir is given; the new pair appears
only when complete. Errors are one line on stderr (exit 2: the input, 1: the work); --debug
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.outputs import add_overwrite_flag  # noqa: E402

PROG = "preprocess_data.py"


def load_tokenizer(name: str | None, gguf_file: str | None = None):
    """A HF tokenizer from a local directory, a cached hub repo id (or the offline tiny test
    tokenizer for 'tiny'); checked before anything loads (common/model_paths.py)."""
    if name in (None, "tiny"):
        from megatron_gem.testing import make_tiny_tokenizer

        return make_tiny_tokenizer()
    from megatron_gem.common.errors import InputError, ModelLoadError, one_line
    from megatron_gem.common.model_paths import check_model_source

    if gguf_file:
        check_model_source("--tokenizer", name, config=False)
        if not os.path.isfile(os.path.join(name, gguf_file)):
            raise InputError(f"--gguf-file {gguf_file}: no such file in --tokenizer {name}")
    else:
        check_model_source("--tokenizer", name, config=False, tokenizer=True)
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"--tokenizer {name}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (jsonl/json/txt/parquet, optionally .gz)")
    p.add_argument("--output-prefix", required=True, help="path prefix of the output; the files are PREFIX_KEY_document.bin/.idx")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory ('tiny' = offline test tokenizer)")
    p.add_argument("--gguf-file", default=None, help="load the tokenizer from this GGUF file inside --tokenizer")
    p.add_argument("--json-keys", nargs=1, default=["text"], help="field holding the text (one key)")
    p.add_argument("--txt-unit", choices=["document", "paragraph", "line"], default="document", help="what one .txt document is")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOS token to every document")
    p.add_argument("--no-special-tokens", action="store_true", help="do not let the tokenizer add BOS etc.")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes")
    p.add_argument("--batch-size", type=int, default=512, help="documents per tokeniser call")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--max-chars", type=int, default=None, help="documents longer than this are bad records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_flag(p, help="replace an existing PREFIX_KEY_document.bin/.idx pair (HF Trainer's --overwrite_output_dir); nothing else is touched")
    add_debug_flag(p)
    return p


def preprocess(args) -> None:
    from megatron_gem.common.errors import InputError
    from megatron_gem.data.preprocess import check_output_prefix, preprocess_to_indexed
    from megatron_gem.data.readers import resolve_paths

    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size), ("--max-chars", args.max_chars)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    # Inputs and output first (cheap), then the tokenizer, then the work.
    resolve_paths(args.input)
    check_output_prefix(args.output_prefix, args.json_keys[0], overwrite=args.overwrite_output_dir)
    tok = load_tokenizer(args.tokenizer, args.gguf_file)
    prefix, stats = preprocess_to_indexed(
        args.input,
        tok,
        args.output_prefix,
        text_field=args.json_keys[0],
        txt_unit=args.txt_unit,
        on_bad="skip" if args.skip_bad_records else "error",
        max_chars=args.max_chars,
        workers=args.workers,
        batch_size=args.batch_size,
        add_special_tokens=not args.no_special_tokens,
        append_eod=args.append_eod,
        progress=not args.no_progress,
        overwrite=args.overwrite_output_dir,
    )
    print(stats.report("preprocess"))
    print(f"[preprocess] wrote {prefix}.bin and {prefix}.idx")
    print(
        json.dumps(
            {"output_prefix": prefix, **{k: v for k, v in stats.to_dict().items() if k in ("documents_read", "documents_skipped", "skipped", "tokens_in")}}
        )
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: preprocess(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
