"""Tensor-by-tensor checkpoint I/O for the converter: peak memory is about one layer, not the model.

The model is built on the meta device only to get megatron-core's sharded state dict (keys,
global shapes, layer stacking, the SwiGLU split), so the checkpoint layout is exactly the one
``dist_checkpointing.save`` of a live model writes (``checkpoint_io.save_model``, the reference
the tests compare against). Only the bytes are produced lazily:

  save_dist_checkpoint_lazily   megatron-core's own save pipeline (common.pt, metadata.json,
                                torch_dist .metadata) with a save strategy whose planner builds
                                each chunk when the writer asks for it, one file per chunk, so no
                                file (and no buffer) holds more than one tensor
  iter_dist_checkpoint_groups   reads a dist checkpoint one group of parameters (the embedding,
                                one decoder layer, the rest) at a time
  SafetensorsShardWriter        writes HF safetensors shards as the tensors arrive

Coordinates: in the dist checkpoint a decoder parameter is one global tensor stacked over the
layers (prepended axis = layer index); the rest of the global tensor is the full (TP=1)
megatron parameter, so every chunk is a slice of the full parameter of one layer.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from ..common.manifest import CheckpointError
from .hf_mapping import SAFETENSORS_DTYPE_NAME

_LAYER_LOCAL = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# global megatron parameter name -> its full TP=1 tensor (cast to the checkpoint's dtype here)
Materialize = Callable[[str], torch.Tensor]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, mininterval=2.0)


def _sharded_key_to_param(model) -> dict[str, tuple[str, bool]]:
    """Sharded-checkpoint key -> (parameter name, stacked over layers) for every tensor of
    ``model.sharded_state_dict()``. Decoder parameters get a ``{layer}`` placeholder."""
    out: dict[str, tuple[str, bool]] = {}
    for local, sh in model.sharded_state_dict().items():
        key = getattr(sh, "key", None)
        if key is None or local.endswith("_extra_state"):
            continue
        m = _LAYER_LOCAL.match(local)
        name, stacked = (f"decoder.layers.{{layer}}.{m.group(2)}", True) if m else (local, False)
        if out.setdefault(key, (name, stacked)) != (name, stacked):
            raise ValueError(f"sharded key {key!r} maps to two parameters: {out[key][0]!r} and {name!r}")
    return out


class _Chunks:
    """Builds one saved chunk (global key, offsets, sizes) from full parameters; keeps the last
    full parameter, since the SwiGLU halves of linear_fc1 are two chunks of one parameter."""

    def __init__(self, key_map: dict[str, tuple[str, bool]], materialize: Materialize):
        self.key_map = key_map
        self.materialize = materialize
        self._last: tuple[str, torch.Tensor] | None = None
        self._lock = threading.Lock()  # the writer's thread and the prefetch thread

    def __call__(self, key: str, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            return self._build(key, offsets, sizes, dtype)

    def _build(self, key: str, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        name, stacked = self.key_map[key]
        if stacked:
            name = name.format(layer=int(offsets[0]))
            offsets, sizes, lead = offsets[1:], sizes[1:], (int(sizes[0]),)
            if lead != (1,):
                raise ValueError(f"{key}: a chunk spans {lead[0]} layers; expected one")
        else:
            lead = ()
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous parameter before building the next one
            self._last = (name, self.materialize(name).to(dtype))
        full = self._last[1]
        if full.dim() != len(sizes):
            raise ValueError(f"{name}: full parameter has {full.dim()} dims, the checkpoint chunk {len(sizes)}")
        part = full
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            part = part.narrow(dim, int(o), int(s))
        part = part.reshape(*lead, *part.shape).contiguous()
        # A slice of a bigger tensor (the SwiGLU halves) gets storage of its own here (the
        # prefetch thread) rather than in the writer, which copies such views before writing.
        return part.clone() if part.untyped_storage().nbytes() != part.nbytes else part


def _item_key(write_item) -> tuple:
    return (write_item.index.fqn, tuple(write_item.index.offset or ()))


_POOL: ThreadPoolExecutor | None = None


def _prefetch_pool() -> ThreadPoolExecutor:
    """One background thread for reading ahead (tensor copies and file reads release the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="convert-prefetch")
    return _POOL


_END = object()


def prefetched(iterable):
    """Iterate ``iterable`` with its next item produced in the background meanwhile (one ahead:
    at most two items exist at a time)."""
    it = iter(iterable)
    pending = _prefetch_pool().submit(next, it, _END)
    while True:
        item = pending.result()
        if item is _END:
            return
        pending = _prefetch_pool().submit(next, it, _END)
        yield item
        del item


def _lazy_strategy(chunks: _Chunks, progress):
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        """Builds each tensor chunk when the writer asks for it, and the next one in a
        background thread meanwhile (reading and converting overlap writing; at most two chunks
        exist at a time)."""

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            self._order = [wi for wi in plan.items if wi.type != WriteItemType.BYTE_IO]  # the writer's order
            self._position = {_item_key(wi): i for i, wi in enumerate(self._order)}
            self._ahead: tuple[tuple, Future] | None = None
            return plan

        def _lazy(self, write_item) -> torch.Tensor | None:
            obj = super().resolve_data(write_item)
            return obj if isinstance(obj, torch.Tensor) and obj.is_meta else None

        def _build(self, write_item, meta: torch.Tensor) -> torch.Tensor:
            chunk = write_item.tensor_data.chunk
            data = chunks(write_item.index.fqn, chunk.offsets, chunk.sizes, meta.dtype)
            if tuple(data.shape) != tuple(meta.shape):
                raise ValueError(f"{write_item.index.fqn} at {tuple(chunk.offsets)}: built {tuple(data.shape)}, checkpoint expects {tuple(meta.shape)}")
            return data

        def resolve_data(self, write_item):
            meta = self._lazy(write_item)
            if meta is None:
                return super().resolve_data(write_item)  # bytes, and real tensors (GEM's logit scale)
            key = _item_key(write_item)
            ahead, self._ahead = self._ahead, None
            data = ahead[1].result() if ahead is not None and ahead[0] == key else self._build(write_item, meta)
            del ahead
            i = self._position.get(key)
            if i is not None and i + 1 < len(self._order):
                nxt = self._order[i + 1]
                nxt_meta = self._lazy(nxt)
                if nxt_meta is not None:
                    self._ahead = (_item_key(nxt), _prefetch_pool().submit(self._build, nxt, nxt_meta))
            progress.update(1)
            return data

    class LazySaveStrategy(TorchDistSaveShardedStrategy):
        """torch_dist format, written synchronously, one file per chunk, chunks built on demand."""

        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            progress.total = sum(1 for shards in flat.values() for sh in shards if isinstance(getattr(sh, "data", None), torch.Tensor) and sh.data.is_meta)
            progress.refresh()
            state = mcore_to_pyt_state_dict(flat, False)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1)
            from torch.utils.serialization import config as serialization_config

            # Each chunk is one torch.save record; its zip CRC32 (not checked on load) cost about
            # as much as writing the bytes (see tools/bench_convert.py).
            with serialization_config.patch({"save.compute_crc32": False}):
                dcp.save(state, storage_writer=writer, planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return LazySaveStrategy()


def save_dist_checkpoint_lazily(meta_model, directory: str, materialize: Materialize, *, progress: bool = True) -> None:
    """Write the dist checkpoint of ``meta_model`` (a GEM GPTModel on the meta device, TP=PP=1)
    into ``directory`` with the weights ``materialize(global_name)`` returns."""
    from megatron.core import dist_checkpointing

    chunks = _Chunks(_sharded_key_to_param(meta_model), materialize)
    os.makedirs(directory, exist_ok=True)
    with _progress(0, "writing megatron checkpoint", progress) as bar:
        dist_checkpointing.save({"model": meta_model.sharded_state_dict()}, directory, sharded_strategy=_lazy_strategy(chunks, bar))


def _group_of(local: str) -> str:
    m = _LAYER_LOCAL.match(local)
    if m:
        return f"layer {m.group(1)}"
    return "embedding" if local.startswith("embedding.") else "head"


class _SafeUnpickler(pickle.Unpickler):
    """The DCP ``.metadata`` file is a pickle; allow only the classes it is made of."""

    def find_class(self, module, name):
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "collections" and name == "OrderedDict")
            or (module == "builtins" and name in ("set", "frozenset", "slice"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata (only checkpoint metadata types are allowed)")
        return super().find_class(module, name)


def read_dcp_metadata(directory: str):
    """The torch_dist checkpoint's ``.metadata`` through the restricted unpickler."""
    path = os.path.join(directory, ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no .metadata; not a megatron-core torch_dist checkpoint")
    with open(path, "rb") as f:
        try:
            return _SafeUnpickler(f).load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refusing to load"):  # a class outside checkpoint metadata: not loaded, by design
                raise pickle.UnpicklingError(f"{path}: {e}") from e
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def _safe_reader(directory: str, metadata):
    """A DCP reader of ``directory`` that uses ``metadata`` (read once, safely) instead of
    unpickling .metadata itself."""
    import dataclasses

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            storage_meta = dataclasses.replace(metadata.storage_meta or StorageMeta(), load_id=self.load_id)
            return dataclasses.replace(metadata, storage_meta=storage_meta, planner_data=metadata.planner_data or {})

    return SafeMetadataReader(directory)


def _chunk_load_planner(wanted: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
    """A DCP load planner that fills the given destination chunks, each (key, global offsets) ->
    tensor of the chunk's shape, from whatever chunks the checkpoint stored (any TP/PP)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            items = []
            for (key, offsets), dest in wanted.items():
                md = self.metadata.state_dict_metadata.get(key)
                if not isinstance(md, TensorStorageMetadata):
                    raise KeyError(f"tensor {key!r} is not in the checkpoint")
                if len(md.size) != dest.dim() or any(o + s > g for o, s, g in zip(offsets, dest.shape, md.size)):
                    raise ValueError(f"{key}: checkpoint holds shape {tuple(md.size)}, the model wants {tuple(dest.shape)} at {offsets}")
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, md, [chunk])
            covered = Counter()
            for it in items:
                covered[(it.dest_index.fqn, tuple(it.dest_index.offset))] += math.prod(it.lengths)
            for (key, offsets), dest in wanted.items():
                if covered[(key, tuple(offsets))] != dest.numel():
                    raise ValueError(f"{key}: the checkpoint's chunks cover {covered[(key, tuple(offsets))]} of {dest.numel()} elements at {offsets}")
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            dest = wanted[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, o, n)
            return dest

        def commit_tensor(self, read_item, tensor):
            pass  # copied in place by the reader

    return ChunkLoadPlanner()


def parameter_groups(meta_model) -> list[list[tuple[str, torch.Tensor]]]:
    """The model's parameters (global names, TP=PP=1) in reading order: the embedding, each
    decoder layer, then the final norm / output layer / logit scale."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, param in meta_model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(param, torch.Tensor):
            continue
        groups.setdefault(_group_of(name), []).append((name, param))
    order = ["embedding"] + [f"layer {i}" for i in range(len(meta_model.decoder.layers))] + ["head"]
    return [groups[g] for g in order if g in groups]


def _unreadable_data_file(directory: str, metadata, keys: set) -> str | None:
    """The first data file of ``directory`` holding one of ``keys`` whose stored tensor does not
    load (torch.load(weights_only=True) of its byte range, as DCP reads it); for the message
    after a failed read. None when none is found (e.g. a transformed storage)."""
    import io

    for index, info in sorted((metadata.storage_data or {}).items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        if index.fqn not in keys or getattr(info, "transform_descriptors", None):
            continue
        path = os.path.join(directory, info.relative_path)
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        except Exception:
            return info.relative_path
    return None


def iter_dist_checkpoint_groups(meta_model, directory: str, *, progress: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {parameter name: full TP=1 tensor} of a megatron-core dist checkpoint (converted or
    trained, saved at any TP/PP), one group at a time: the embedding, each decoder layer, then
    the final norm / output layer / logit scale. ``meta_model``: the TP=PP=1 GEM GPTModel on the
    meta device (names, shapes, dtypes). Reads only the model's tensors, through a restricted
    unpickler for the .metadata file and torch.load(weights_only=True) for the data."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    metadata = read_dcp_metadata(directory)  # once; refuses unsafe pickles up front
    stored = metadata.state_dict_metadata
    key_of = {}
    for key, (name, stacked) in _sharded_key_to_param(meta_model).items():
        key_of[name] = (key, stacked)
    groups = parameter_groups(meta_model)
    with _progress(sum(len(g) for g in groups), "reading megatron checkpoint", progress) as bar:
        for params in groups:
            out, wanted = {}, {}
            for name, param in params:
                m = _LAYER_LOCAL.match(name)
                key, stacked = key_of[f"decoder.layers.{{layer}}.{m.group(2)}" if m else name]
                if key not in stored:
                    raise ValueError(f"{directory}: tensor {key!r} ({name}) is not in the checkpoint; does megatron_gem.json describe this checkpoint?")
                out[name] = torch.empty(param.shape, dtype=param.dtype)
                if stacked:
                    wanted[(key, (int(m.group(1)),) + (0,) * param.dim())] = out[name].view(1, *param.shape)
                else:
                    wanted[(key, (0,) * param.dim())] = out[name]
            try:
                load({}, storage_reader=_safe_reader(directory, metadata), planner=_chunk_load_planner(wanted))
            except (Exception, CheckpointException) as e:  # DCP wraps a bad data file in its own (BaseException); name the files read
                cause = next(iter(getattr(e, "failures", {}).values()), e)
                cause = cause[0] if isinstance(cause, tuple) else getattr(cause, "exc", cause)  # DCP's per-rank wrapper
                first = f"{type(cause).__name__}: " + next((line for line in str(cause).splitlines() if line.strip()), "")
                bad = _unreadable_data_file(directory, metadata, {k for k, _ in wanted}) or "its data files"
                raise CheckpointError(f"{os.path.join(directory, bad)}: unreadable ({first.strip()[:200]})") from e
            # The planner and reader classes are built per call (reference cycles): drop the
            # views into ``out`` now, or every group would stay alive until a cyclic GC pass.
            wanted.clear()
            bar.update(len(params))
            yield out


class SafetensorsShardWriter:
    """HF safetensors shards written while the tensors arrive, without holding a shard in memory.

    safetensors' own ``save_file`` needs a whole file's tensors at once (an 8B model's 5 GB
    shard would be the peak memory), so the files are written here in the same documented
    format: an 8-byte little-endian header length, the JSON header (dtype, shape, data offsets,
    padded with spaces to 8 bytes), then the raw bytes. The header needs every tensor's shape
    up front: ``plan`` lists (name, shape, dtype) in arrival order, split into shards of at most
    ``max_shard_bytes`` (HF's ``max_shard_size``); files are model.safetensors (one shard) or
    model-00001-of-00003.safetensors and so on (HF's names)."""

    def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.directory = directory
        self.plan = plan
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(plan):
            n = _nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += n
        self.shards = [s for s in shards if s]
        count = len(self.shards)
        self.file_of = {}
        for k, members in enumerate(self.shards):
            name = "model.safetensors" if count == 1 else f"model-{k + 1:05d}-of-{count:05d}.safetensors"
            for i in members:
                self.file_of[i] = (k, name)
        self.next = 0
        self._file = None
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)

    def _open(self, shard: int, name: str) -> None:
        import json

        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[shard]:
            tname, shape, dtype = self.plan[i]
            n = _nbytes(shape, dtype)
            header[tname] = {"dtype": SAFETENSORS_DTYPE_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(os.path.join(self.directory, name), "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.plan) or self.plan[self.next][0] != name:
            expected = self.plan[self.next][0] if self.next < len(self.plan) else "nothing"
            raise ValueError(f"safetensors writer: got {name!r}, expected {expected!r} (tensors must arrive in plan order)")
        _, shape, dtype = self.plan[self.next]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
        shard, file_name = self.file_of[self.next]
        if self._file is None:
            self._open(shard, file_name)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.next += 1
        if self.next == len(self.plan) or self.file_of[self.next][0] != shard:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> tuple[dict[str, str], int]:
        """Check that everything arrived; returns (weight map, total bytes)."""
        if self.next != len(self.plan):
            raise ValueError(f"safetensors writer: {len(self.plan) - self.next} planned tensors never arrived (first: {self.plan[self.next][0]!r})")
        return {self.plan[i][0]: self.file_of[i][1] for i in range(len(self.plan))}, self.total_bytes


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (HF's max_shard_size spelling)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * units[m.group(2).upper()])
