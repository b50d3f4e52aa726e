"""Writing a corpus as a Megatron ``.bin/.idx`` pair (data/indexed.py: megatron-core's format,
without megatron-core)."""

from __future__ import annotations

import os

import numpy as np

from .indexed import IndexedFileWriter, optimal_dtype, split_prefix


class IndexedWriter:
    """Writes documents as a Megatron ``.bin/.idx`` pair, one sequence per document; the token
    dtype is Megatron's choice for ``vocab_size`` (uint16 below 65,500 ids, else int32)."""

    def __init__(self, path_prefix: str | os.PathLike, vocab_size: int):
        self.path_prefix = split_prefix(path_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        self.dtype = optimal_dtype(vocab_size)
        self._file = IndexedFileWriter(self.path_prefix, self.dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}")
        self._file.add_document(tokens)
        self.documents += 1
        self.tokens += int(tokens.shape[0])

    def close(self) -> str:
        self._file.finalize()
        return self.path_prefix

    def abort(self) -> None:
        """Close the data file without writing the index (the caller removes what was written)."""
        self._file.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()
