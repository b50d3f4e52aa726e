"""An on-disk cache of a teacher's embeddings, keyed by (text, teacher digest).

Layout: ``ROOT/<digest hex>/`` holds ``teacher.json`` (the digest, the dimension, where the
teacher was loaded from) and shards ``emb-<uuid>.safetensors``, each with two tensors:
``keys`` (uint8 [n, 32], the sha256 of each text's UTF-8 bytes) and ``embeddings`` (float32
[n, d]), and the teacher's digest in its metadata. Every file is written atomically
(common/files.py) and a shard is never rewritten, so several processes (ranks) can add shards
to one folder at once; each process sees the shards present when it opened the cache plus its
own. A shard or ``teacher.json`` that names another teacher is an error, never read: a
teacher's folder only ever answers for that teacher.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid

import numpy as np

from ..common.files import write_bytes_atomic, write_json_atomic


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """The cached embeddings of one teacher (``digest``, dimension ``dim``) under ``root``.

    ``get(keys)`` -> the rows found; ``put(keys, vectors)`` adds a shard. ``hits``/``misses``
    are kept by the caller (:class:`~megatron_gem.distill.teacher.Teacher`)."""

    def __init__(self, root: str, digest: str, dim: int, *, source: str = ""):
        self.digest, self.dim = digest, dim
        self.dir = os.path.join(root, digest.split(":", 1)[-1])
        os.makedirs(self.dir, exist_ok=True)
        info = os.path.join(self.dir, "teacher.json")
        if os.path.isfile(info):
            with open(info) as f:
                found = json.load(f)
            if found.get("digest") != digest or found.get("dim") != dim:
                raise ValueError(f"{info}: an embedding cache of teacher {found.get('digest')} (dim {found.get('dim')}), not of {digest} (dim {dim}): not read")
        else:
            write_json_atomic(info, {"digest": digest, "dim": dim, "source": source, "format": 1})
        self._rows: dict[bytes, np.ndarray] = {}
        for path in sorted(glob.glob(os.path.join(self.dir, "emb-*.safetensors"))):
            self._load_shard(path)

    def _load_shard(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("teacher_digest") != self.digest:
                raise ValueError(f"{path}: embeddings of teacher {meta.get('teacher_digest')}, not of {self.digest}: not read")
            keys, vectors = f.get_tensor("keys"), f.get_tensor("embeddings")
        if keys.ndim != 2 or keys.shape[1] != 32 or vectors.shape != (len(keys), self.dim) or vectors.dtype != np.float32:
            raise ValueError(
                f"{path}: malformed cache shard (keys {keys.shape}, embeddings {vectors.shape} {vectors.dtype}; expected [n, 32] and [n, {self.dim}] float32)"
            )
        for k, v in zip(keys, vectors):
            self._rows[k.tobytes()] = v

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: bytes) -> bool:
        return key in self._rows

    def get(self, key: bytes) -> np.ndarray | None:
        return self._rows.get(key)

    def put(self, keys: list[bytes], vectors: np.ndarray) -> str | None:
        """Store ``vectors`` (float32 [n, dim]) under ``keys`` as one new shard; returns its path."""
        from safetensors.numpy import save

        vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)  # the caller may reuse its array
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"put: {len(keys)} keys but embeddings of shape {vectors.shape} (dim {self.dim})")
        if not keys:
            return None
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        path = os.path.join(self.dir, f"emb-{uuid.uuid4().hex}.safetensors")
        write_bytes_atomic(path, save({"keys": key_array, "embeddings": vectors}, metadata={"teacher_digest": self.digest}))
        for k, v in zip(keys, vectors):
            self._rows[k] = v
        return path
