#!/usr/bin/env python
"""Write the unlabelled training text of the installed sources as jsonl (``{"text", "source"}``
records), disjoint from every evaluation text and deduplicated (eval/training_text.py):

    python tools/write_training_text.py --out data/distill.jsonl [--max-per-source 50000] [--seed 0]
    python tools/write_training_text.py --out data/natural.jsonl --kind natural --limit 30000

``--kind distillation`` (default) reads every source of ``DISTILLATION_SOURCES`` (WordNet
training glosses and examples, non-evaluation fortunes, GCIDE, Debian package descriptions, man
pages; ``--sources`` picks some); ``--kind natural`` the natural-sentence text of the
reproduction. ``--debian-packages FILE ...`` reads package descriptions from control-format
files (default: the dpkg status file; ``apt-cache dumpavail > FILE`` lists every package apt
knows). The file is the ``--data`` format (``--text-field text``); the counts per source (read,
kept, dropped and why) go to ``<out>.counts.json`` and are printed. An existing ``--out`` (or its
counts file) is refused before any corpus is read, unless ``--overwrite``; both are written
atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_gem.eval.training_text import DISTILLATION_SOURCES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the jsonl file to write (must not exist; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its counts file")
    p.add_argument("--kind", choices=["distillation", "natural"], default="distillation")
    p.add_argument("--sources", nargs="+", choices=DISTILLATION_SOURCES, default=list(DISTILLATION_SOURCES), help="--kind distillation: the sources to read")
    p.add_argument("--max-per-source", type=int, default=None, help="--kind distillation: a seeded sample of at most N texts per source")
    p.add_argument("--debian-packages", nargs="+", default=None, help="control-format files of package descriptions (default: the dpkg status file)")
    p.add_argument("--limit", type=int, default=None, help="at most N texts in all (after the shuffle)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag, value in (("--max-per-source", args.max_per_source), ("--limit", args.limit)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1 (got {value})")
    for path in args.debian_packages or ():
        if not os.path.isfile(path):
            p.error(f"--debian-packages {path}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: the folder {out_dir} does not exist")
    from megatron_gem.eval.training_text import counts_path

    for path in (args.out, counts_path(args.out)):
        if os.path.isdir(path):
            p.error(f"--out {args.out}: {path} is a directory")
        if os.path.exists(path) and not args.overwrite:
            p.error(f"--out {args.out}: {path} exists; pass --overwrite to replace it")

    from megatron_gem.eval.corpora import CorpusMissing
    from megatron_gem.eval.training_text import distillation_texts, natural_sentences, write_jsonl

    try:
        if args.kind == "natural":
            text = natural_sentences(args.limit, seed=args.seed)
        else:
            text = distillation_texts(args.max_per_source, seed=args.seed, sources=args.sources, debian_files=args.debian_packages)
            if args.limit is not None:
                text.texts, text.sources = text.texts[: args.limit], text.sources[: args.limit]
    except CorpusMissing as e:
        raise SystemExit(f"write_training_text: {e}")
    write_jsonl(args.out, text)
    print(text.report())
    print(f"wrote {len(text.texts)} texts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
