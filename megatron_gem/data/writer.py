"""Writing a corpus as a Megatron ``.bin/.idx`` pair (megatron-core's IndexedDatasetBuilder)."""

from __future__ import annotations

import os

import numpy as np

from .corpus import _import_indexed_dataset


class IndexedWriter:
    """Writes documents as a Megatron ``.bin/.idx`` pair via megatron-core's IndexedDatasetBuilder."""

    def __init__(self, path_prefix: str | os.PathLike, vocab_size: int):
        self.path_prefix = str(path_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        idx = _import_indexed_dataset()
        self.dtype = idx.DType.optimal_dtype(vocab_size)
        self._builder = idx.IndexedDatasetBuilder(idx.get_bin_path(self.path_prefix), dtype=self.dtype)
        self._idx_path = idx.get_idx_path(self.path_prefix)
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}")
        # add_document only needs an array (it calls numpy.array on it); a numpy array avoids a
        # torch __array__ deprecation warning.
        self._builder.add_document(tokens.astype(self.dtype), [int(tokens.shape[0])])
        self.documents += 1
        self.tokens += int(tokens.shape[0])

    def close(self) -> str:
        self._builder.finalize(self._idx_path)
        return self.path_prefix

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._builder.data_file.close()
