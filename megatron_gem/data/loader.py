"""The distributed, resumable loader (Megatron's sample arithmetic) over datasets.py.

A global batch is ``global_batch_size`` consecutive samples = micro_batch_size x
data-parallel size x gradient-accumulation steps. Micro-step m of a global batch takes the
next ``micro_batch_size * dp_size`` samples, and data-parallel rank r the r-th
``micro_batch_size`` of them, so the union over ranks of a step equals the one-rank global
batch. ``consumed_samples`` (all ranks together, as Megatron counts it) is the whole iterator
state: a resumed loader continues with exactly the next sample. A final incomplete global
batch is dropped.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..gem.config import GEMConfig
from .blend import BlendedDataset, CorpusBlend
from .datasets import PackedDataset, StreamingPackedDataset


class MegatronBatchSampler:
    """Global sample indices of this rank's micro-batches, from ``consumed_samples`` on."""

    def __init__(self, total_samples: int | None, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int):
        self.total, self.consumed = total_samples, int(consumed_samples)
        self.mbs, self.rank, self.dp = int(micro_batch_size), int(data_parallel_rank), int(data_parallel_size)
        if not 0 <= self.rank < self.dp:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} outside [0, {data_parallel_size})")
        if self.consumed % (self.mbs * self.dp):
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x dp = {self.mbs * self.dp}")

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp
        start = self.consumed
        while self.total is None or start + step <= self.total:
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("endless sampler")
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp))


def _dist_rank_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GEMDataLoader:
    """Yields this rank's micro-batches (dicts of int64 [B, seq_length] tensors); resumable.

    ``global_batch_size`` defaults to micro_batch_size x dp size (no accumulation) and must be a
    multiple of it; ``num_microbatches`` = global / (micro x dp). ``data_parallel_rank/size``
    default to torch.distributed's rank/world size (pass the DP group's under TP/PP).
    ``num_workers`` torch DataLoader workers build rows (map-style datasets only); they do not
    change the batches. ``state_dict()`` goes into checkpoints; ``load_state_dict`` restores it.
    """

    def __init__(
        self,
        dataset,
        *,
        micro_batch_size: int,
        global_batch_size: int | None = None,
        data_parallel_rank: int | None = None,
        data_parallel_size: int | None = None,
        num_workers: int = 0,
        consumed_samples: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        if data_parallel_rank is None or data_parallel_size is None:
            r, s = _dist_rank_size()
            data_parallel_rank = r if data_parallel_rank is None else data_parallel_rank
            data_parallel_size = s if data_parallel_size is None else data_parallel_size
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = int(micro_batch_size), int(data_parallel_rank), int(data_parallel_size)
        step = self.micro_batch_size * self.dp_size
        self.global_batch_size = int(global_batch_size or step)
        if self.global_batch_size % step:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = {step}")
        self.streaming = isinstance(dataset, StreamingPackedDataset)
        if self.streaming and num_workers:
            raise ValueError("a StreamingPackedDataset runs in the main process (num_workers=0); use num_proc for tokenising")
        self.num_workers, self.pin_memory, self.prefetch_factor = int(num_workers), pin_memory, prefetch_factor
        self.consumed_samples = int(consumed_samples)
        MegatronBatchSampler(None, self.consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size)  # validates

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def total_samples(self) -> int | None:
        """Samples the run will consume: all epochs, cut to whole global batches (None if endless)."""
        if self.streaming:
            return None
        total = self.dataset.total_samples()
        return None if total is None else total - total % self.global_batch_size

    def __len__(self) -> int:
        """Micro-batches left for this rank."""
        total = self.total_samples()
        if total is None:
            raise TypeError("endless loader (num_epochs=None or a stream) has no length")
        return max(0, (total - self.consumed_samples) // (self.micro_batch_size * self.dp_size))

    def __iter__(self) -> Iterator[dict]:
        if self.streaming:
            yield from self._iter_stream()
            return
        sampler = MegatronBatchSampler(self.total_samples(), self.consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size)
        if self.num_workers and isinstance(self.dataset, PackedDataset):
            # Plan the current epoch here so forked workers inherit it instead of each re-planning.
            try:
                self.dataset.plan(self.dataset.locate(self.consumed_samples)[0])
            except IndexError:
                pass  # nothing left to load
        kwargs = {}
        if self.num_workers:
            kwargs = dict(multiprocessing_context="fork", prefetch_factor=self.prefetch_factor)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.dataset.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        step = self.micro_batch_size * self.dp_size
        for batch in loader:
            self.consumed_samples += step
            yield batch

    def _iter_stream(self) -> Iterator[dict]:
        gbs, step = self.global_batch_size, self.micro_batch_size * self.dp_size
        skip = self.consumed_samples
        pending: list = []
        for row in self.dataset.iter_all_rows():
            if skip:
                skip -= 1
                continue
            pending.append(row)
            if len(pending) < gbs:
                continue
            # A whole global batch is here: it exists in every run, so it may be handed out.
            for m in range(self.num_microbatches):
                first = m * step + self.dp_rank * self.micro_batch_size
                batch = self.dataset.collate(pending[first : first + self.micro_batch_size])
                self.consumed_samples += step
                yield batch
            pending = []

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "data_parallel_size": self.dp_size,
            "fingerprint": self.dataset.fingerprint(),
            **self.dataset.index_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``consumed_samples``; the dataset must be the one the state was saved with.

        Data-parallel size and micro batch size may change on resume (as in Megatron) when
        consumed_samples stays a multiple of micro_batch_size x dp size.
        """
        fp = self.dataset.fingerprint()
        if state.get("fingerprint") != fp:
            raise ValueError(f"data loader state belongs to another dataset:\n  saved: {state.get('fingerprint')}\n  here:  {fp}")
        MegatronBatchSampler(None, state["consumed_samples"], self.micro_batch_size, self.dp_rank, self.dp_size)
        self.dataset.load_index_state(state)
        self.consumed_samples = int(state["consumed_samples"])


def make_ntp_loader(
    corpus,
    config: GEMConfig,
    seq_length: int,
    *,
    micro_batch_size: int,
    global_batch_size: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    tokenizer=None,
    **loader_kwargs,
) -> GEMDataLoader:
    """PackedDataset + GEMDataLoader with pad/BOS ids taken from ``tokenizer`` when given.

    A :class:`CorpusBlend` gets one endless PackedDataset per source under a BlendedDataset
    (``num_epochs`` then counts blend epochs)."""
    pad_id = bos_id = None
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        bos_id = tokenizer.bos_token_id
    if isinstance(corpus, CorpusBlend):
        sources = [PackedDataset(c, config, seq_length, seed=seed, shuffle=shuffle, pad_id=pad_id or 0, bos_id=bos_id) for c in corpus.corpora]
        ds = BlendedDataset(sources, corpus.weights, names=corpus.names, num_epochs=num_epochs)
    else:
        ds = PackedDataset(corpus, config, seq_length, seed=seed, shuffle=shuffle, num_epochs=num_epochs, pad_id=pad_id or 0, bos_id=bos_id)
    return GEMDataLoader(ds, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, **loader_kwargs)
