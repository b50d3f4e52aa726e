#!/usr/bin/env python
"""Tokenise text files into a Megatron indexed dataset (.bin/.idx), as Megatron users expect.

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \
        --tokenizer path/to/hf_model [--json-keys text] [--append-eod] [--workers 4]

Writes ``{output-prefix}_{json-key}_document.bin/.idx`` with megatron-core's
IndexedDatasetBuilder (one sequence per document), shows a progress bar and ends with a
summary: documents read, skipped (by reason), tokens. Structural problems (malformed JSON, a
missing text field, invalid UTF-8, ...) stop with the file and line named, unless
--skip-bad-records is given. GEM layouts are not baked in: they are drawn per epoch at load time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tokenizer(name: str | None, gguf_file: str | None = None):
    """A HF tokenizer from a local directory (or the offline tiny test tokenizer for 'tiny')."""
    if name in (None, "tiny"):
        from megatron_gem.testing import make_tiny_tokenizer

        return make_tiny_tokenizer()
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(name, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (jsonl/json/txt/parquet, optionally .gz)")
    p.add_argument("--output-prefix", required=True)
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
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from megatron_gem.data.preprocess import preprocess_to_indexed
    from megatron_gem.data.readers import DataError

    tok = load_tokenizer(args.tokenizer, args.gguf_file)
    try:
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
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stats.summary("preprocess"))
    print(f"[preprocess] wrote {prefix}.bin and {prefix}.idx")
    print(
        json.dumps(
            {"output_prefix": prefix, **{k: v for k, v in stats.to_dict().items() if k in ("documents_read", "documents_skipped", "skipped", "tokens_in")}}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
