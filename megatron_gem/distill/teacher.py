"""The teacher of embedding distillation: a frozen sentence-transformers embedder.

``Teacher.from_pretrained(DIR)`` loads any sentence-transformers folder offline (local files,
safetensors weights, the library's own module types: no remote code, no pickle);
``teacher.embed(texts)`` returns float32 [n, d] L2-normalised rows on the CPU, computed without
gradient. A Teacher is a plain object, not an ``nn.Module``: assigned to a student module's
attribute it is never registered as a submodule, so it never enters a state dict, an export, an
optimizer or ZeRO's partitioning. ``digest`` is a content hash of its files (weights, config,
tokenizer); with ``cache_dir`` its embeddings are kept on disk per (text, digest)
(:mod:`.cache`) for repeated epochs.

Batches: rows are computed by ``SentenceTransformer.encode`` (length-sorted batches of
``batch_size``). A row depends on its batch only through padding, i.e. at fp32 rounding; the
same call gives the same bits, and the cache returns the bits it stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..common.errors import ModelLoadError
from ..common.manifest import sha256_of
from .embedding_cache import EmbeddingCache, text_key

FLAG = "--contrastive-teacher"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Files the digest leaves out: documentation and the weights of other backends (ONNX, OpenVINO),
# which the torch backend never reads.
_NOT_MODEL = (".md", ".png", ".jpg")
_OTHER_BACKENDS = ("onnx", "openvino")


def _error(path: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{FLAG} {path}: {why}")


def check_teacher_folder(path: str) -> list[dict]:
    """The modules of the sentence-transformers folder at ``path`` (its modules.json), after
    the checks that make loading safe and offline; a ModelLoadError naming ``--contrastive-teacher``
    otherwise."""
    if not os.path.isdir(path):
        raise _error(path, "not a directory (a sentence-transformers model folder is expected)")
    spec = os.path.join(path, "modules.json")
    if not os.path.isfile(spec):
        raise _error(path, "not a sentence-transformers model folder (no modules.json)")
    try:
        with open(spec) as f:
            modules = json.load(f)
    except (OSError, ValueError) as e:
        raise _error(path, f"modules.json is not readable JSON ({e})") from None
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise _error(path, "modules.json is not a list of modules with a 'type'")
    for m in modules:
        if not str(m["type"]).startswith("sentence_transformers."):
            raise _error(path, f"module type {m['type']!r} is not a sentence-transformers module (remote code is not run)")
        folder = os.path.join(path, m.get("path", ""))
        names = os.listdir(folder) if os.path.isdir(folder) else []
        pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickled and not any(n.endswith(".safetensors") for n in names):
            raise _error(path, f"{os.path.join(m.get('path', ''), pickled[0])}: pickled weights are not loaded (safetensors only)")
    return modules


@contextlib.contextmanager
def _outside_zero3():
    """While a ZeRO-3 ``HfDeepSpeedConfig`` is alive (train.py's DeepSpeed engine under ZeRO-3,
    an HF Trainer with a ZeRO-3 config), transformers builds every model it loads under
    DeepSpeed's ``zero.Init``, i.e. partitioned across the ranks. The teacher is no part of the
    engine: it loads as a plain, whole model on every rank."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    live = ref() if ref is not None else None
    if live is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live)


def _model_files(path: str) -> list[tuple[str, str]]:
    """(relative path, full path) of the files that define the model, sorted: weights, configs,
    tokenizer; not docs, hidden files or ONNX/OpenVINO exports (the torch backend reads none)."""
    out = []
    for dirpath, dirnames, names in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _OTHER_BACKENDS]
        for name in names:
            if not name.startswith(".") and not name.endswith(_NOT_MODEL):
                full = os.path.join(dirpath, name)
                out.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    return sorted(out)


_digests: dict[tuple, str] = {}


def teacher_digest(path: str) -> str:
    """``sha256:<hex>`` over (relative path, size, sha256) of every file that defines the model
    (:func:`_model_files`). Any change to what the teacher computes changes it; where the folder
    lives does not. Cached per process by (path, sizes, mtimes): hashing reads every byte."""
    files = _model_files(path)
    stats = tuple((rel, os.stat(full).st_size, os.stat(full).st_mtime_ns) for rel, full in files)
    key = (os.path.realpath(path), stats)
    if key not in _digests:
        h = hashlib.sha256()
        for (rel, full), (_, size, _) in zip(files, stats):
            h.update(f"{rel}\t{size}\t{sha256_of(full)}\n".encode())
        _digests[key] = "sha256:" + h.hexdigest()
    return _digests[key]


class Teacher:
    """A frozen sentence embedder (see the module docstring). ``hits``/``misses`` count the
    requested texts answered from the cache and computed (every text is a miss without a cache)."""

    def __init__(self, model, path: str, digest: str, *, batch_size: int = 64, cache: EmbeddingCache | None = None):
        self._model = model  # a SentenceTransformer; private: nothing should train or save it
        self.path, self.digest, self.batch_size, self.cache = path, digest, batch_size, cache
        self.dim = int(model.get_embedding_dimension())
        self.hits = self.misses = 0

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | torch.device = "cpu", batch_size: int = 64, cache_dir: str | None = None) -> Teacher:
        check_teacher_folder(path)
        from sentence_transformers import SentenceTransformer

        try:
            with _outside_zero3():
                model = SentenceTransformer(
                    path,
                    device=str(device),
                    local_files_only=True,
                    trust_remote_code=False,
                    model_kwargs={"use_safetensors": True, "dtype": torch.float32},
                )
        except (OSError, ValueError, KeyError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _error(path, f"cannot be loaded as a sentence-transformers model: {first}") from None
        model.eval()
        model.requires_grad_(False)
        digest = teacher_digest(path)
        teacher = cls(model, path, digest, batch_size=batch_size)
        if cache_dir:
            teacher.cache = EmbeddingCache(cache_dir, digest, teacher.dim, source=os.path.abspath(path))
        return teacher

    def parameters(self):
        """The teacher's own parameters (frozen); for checks, never for an optimizer."""
        return self._model.parameters()

    def _encode(self, texts: list[str]) -> np.ndarray:
        """float32 [n, d] L2-normalised rows of ``texts``, without gradient (the one place the
        model runs)."""
        with torch.no_grad():
            out = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 [len(texts), d] L2-normalised embeddings on the CPU (no gradient; the caller
        moves them to its device). Texts in the cache are not recomputed; the others are
        computed once each (duplicates included) and added to the cache as one shard."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("Teacher.embed: texts must be strings")
        if self.cache is None:
            self.misses += len(texts)
            unique = list(dict.fromkeys(texts))
            rows = dict(zip(unique, self._encode(unique))) if unique else {}
            return torch.from_numpy(np.stack([rows[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32))
        keys = [text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        found = sum(k in self.cache for k in keys)
        self.hits, self.misses = self.hits + found, self.misses + len(texts) - found
        if missing:
            by_key = dict(zip(keys, texts))
            self.cache.put(missing, self._encode([by_key[k] for k in missing]))
        return torch.from_numpy(np.stack([self.cache.get(k) for k in keys]) if texts else np.zeros((0, self.dim), np.float32))
