"""Megatron's indexed dataset format (``.bin/.idx``, version 1), read and written with numpy.

The same bytes megatron-core's ``IndexedDataset`` / ``IndexedDatasetBuilder`` read and write
(tests/data/test_indexed.py ties both directions to megatron-core), without importing it: the
DeepSpeed engine reads the tokenise-once cache and Megatron-prepared data, and a
``megatron-gem[deepspeed]`` install has no megatron-core.

    .bin   the tokens of every sequence, back to back, in ``dtype``
    .idx   b"MMIDIDX\\x00\\x00"  version <Q = 1  dtype code <B  sequence count <Q  document count <Q
           sequence lengths   int32[sequence count]   (tokens)
           sequence pointers  int64[sequence count]   (byte offsets into .bin)
           document indices   int64[document count]   (0, then the sequence index ending each document)

Multimodal files (a trailing int8 mode per sequence) are not produced here and their modes are
not read.
"""

from __future__ import annotations

import os
import struct

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron-core's DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None):
    """Megatron's choice: uint16 below 65,500 token ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def split_prefix(path_prefix: str | os.PathLike) -> str:
    """``PREFIX`` of ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    path_prefix = str(path_prefix)
    for suffix in (".bin", ".idx"):
        if path_prefix.endswith(suffix):
            return path_prefix[: -len(suffix)]
    return path_prefix


class IndexedFile:
    """A ``.bin/.idx`` pair, memory-mapped: ``sequence_lengths``, ``document_indices`` and
    ``sequence(i)`` (a read-only view of the i-th sequence's tokens)."""

    def __init__(self, path_prefix: str | os.PathLike):
        self.path_prefix = split_prefix(path_prefix)
        idx_path, bin_path = self.path_prefix + ".idx", self.path_prefix + ".bin"
        for path in (bin_path, idx_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file (expected a Megatron .bin/.idx pair)")
        with open(idx_path, "rb") as f:
            fixed = f.read(34)
        if len(fixed) < 34 or fixed[:9] != HEADER:
            raise ValueError(f"{idx_path}: not a Megatron index file (bad header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", fixed[9:34])
        if version != VERSION:
            raise ValueError(f"{idx_path}: index version {version}; this reader knows version {VERSION}")
        if code not in CODE_DTYPES:
            raise ValueError(f"{idx_path}: unknown token dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        need = 34 + 4 * sequences + 8 * sequences + 8 * documents
        if os.path.getsize(idx_path) < need:
            raise ValueError(f"{idx_path}: truncated ({os.path.getsize(idx_path)} bytes, the header promises {need})")
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=34)
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=34 + 4 * sequences)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=documents, offset=34 + 12 * sequences)
        itemsize = np.dtype(self.dtype).itemsize
        tokens = int(self.sequence_lengths.astype(np.int64).sum())
        if os.path.getsize(bin_path) < tokens * itemsize:
            raise ValueError(f"{bin_path}: truncated ({os.path.getsize(bin_path)} bytes, the index promises {tokens * itemsize})")
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if tokens else np.zeros(0, dtype=self.dtype)
        self._starts = self.sequence_pointers // itemsize

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def sequence(self, i: int) -> np.ndarray:
        start = int(self._starts[i])
        return self._bin[start : start + int(self.sequence_lengths[i])]


class IndexedFileWriter:
    """Writes a ``.bin/.idx`` pair, one ``add_document(tokens)`` at a time (one sequence per
    document), the index on ``finalize()``. Files go to their final names; callers that need
    atomicity write under a temporary prefix and rename (data/token_cache.py)."""

    def __init__(self, path_prefix: str | os.PathLike, dtype=np.int32):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"token dtype {dtype} is not one Megatron's format can hold")
        self.path_prefix, self.dtype = split_prefix(path_prefix), dtype
        self._bin = open(self.path_prefix + ".bin", "wb")
        self._lengths: list[int] = []

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(tokens.tobytes(order="C"))
        self._lengths.append(int(tokens.shape[0]))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * np.dtype(self.dtype).itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        with open(self.path_prefix + ".idx", "wb") as f:
            f.write(HEADER + struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], len(lengths), len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))

    def abort(self) -> None:
        self._bin.close()
