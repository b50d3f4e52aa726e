#!/usr/bin/env python
"""Digest throughput on this machine, the figure behind the manifest's choice of sha256
(docs/checkpoints.md): GB/s per core of sha256, blake2b, sha1, md5 and crc32 over random bytes.

    python tools/bench_digest.py [--mib 256]

Last line: one JSON object of the figures (unrounded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zlib

DIGESTS = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake2b": lambda b: hashlib.blake2b(b).digest(),
    "sha1": lambda b: hashlib.sha1(b).digest(),
    "md5": lambda b: hashlib.md5(b).digest(),
    "crc32": zlib.crc32,
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="bytes hashed per digest (MiB)")
    p.add_argument("--repeats", type=int, default=3, help="best of N")
    args = p.parse_args(argv)
    data = os.urandom(args.mib << 20)
    result = {}
    for name, fn in DIGESTS.items():
        best = min(_timed(fn, data) for _ in range(args.repeats))
        result[f"{name}_gb_per_s"] = len(data) / best / 1e9
        print(f"{name:8s} {result[f'{name}_gb_per_s']:.2f} GB/s", flush=True)
    print(json.dumps(result), flush=True)
    return result


def _timed(fn, data) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
