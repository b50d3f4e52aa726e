"""EmbeddingBatcher: texts of concurrent /v1/embeddings requests batched into forwards, as
text-embeddings-inference batches: every text waiting when the worker is free is sorted by
length (longest first, so a batch pads little) and cut into batches of at most
``max_batch_tokens`` padded tokens (the batch's longest text x its texts) and
``max_batch_requests`` texts. At most ``max_queued_texts`` texts wait or run; a request that
would pass that is refused at once (429) instead of waiting without bound.

One batch runs at a time, on the model worker as an urgent job (worker.py); while it runs, the
next requests gather. A request's texts may land in different batches: the vectors do not
depend on the batch (GEMEmbedder: padding and neighbours never change a text's embedding).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from .api_errors import overloaded, unavailable


@dataclass
class _Item:
    tokens: list[int]
    future: asyncio.Future


class EmbeddingBatcher:
    def __init__(self, engine, *, max_batch_tokens: int, max_batch_requests: int, max_queued_texts: int, metrics=None):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queued_texts = max_queued_texts
        self.metrics = metrics
        self._pending: list[_Item] = []
        self._queued = 0  # texts waiting or in the running batch
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gem-embedding-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(unavailable("the server is shutting down"))
        self._pending.clear()

    async def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Unit vectors [n, hidden] of already wrapped texts (in order). Raises APIError 429
        when the queue is full, 503 when the batcher is not running."""
        if self._task is None or self._task.done():
            raise unavailable("the embedding batcher is not running")
        n = len(token_lists)
        if self._queued + n > self.max_queued_texts:
            raise overloaded(f"{self._queued} texts are waiting to be embedded (the limit is {self.max_queued_texts}, --max-queued-texts)")
        loop = asyncio.get_running_loop()
        items = [_Item(list(t), loop.create_future()) for t in token_lists]
        self._queued += n
        self._gauge()
        self._pending.extend(items)
        self._wake.set()
        try:
            rows = await asyncio.gather(*(it.future for it in items))
        finally:
            for it in items:  # a cancelled request: its texts no longer count (the batch may still run them)
                if not it.future.done():
                    it.future.cancel()
            self._queued -= n
            self._gauge()
        return torch.stack(rows)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels("embeddings").set(self._queued)

    def plan(self, items: list) -> list[list]:
        """Batches of ``items`` (objects with ``.tokens``): sorted longest first, each within the
        token budget and the request cap."""
        order = sorted(items, key=lambda it: -len(it.tokens))
        batches, current = [], []
        for it in order:
            width = len(current[0].tokens) if current else len(it.tokens)
            if current and ((len(current) + 1) * width > self.max_batch_tokens or len(current) >= self.max_batch_requests):
                batches.append(current)
                current = []
            current.append(it)
        if current:
            batches.append(current)
        return batches

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                waiting = [it for it in self._pending if not it.future.done()]  # drop what was cancelled
                self._pending = []
                batches = self.plan(waiting)
                # Run the first batch; the rest wait with whatever arrives meanwhile (re-planned).
                batch, rest = (batches[0], [it for b in batches[1:] for it in b]) if batches else ([], [])
                self._pending = rest + self._pending
                if not batch:
                    continue
                try:
                    vectors = await asyncio.wrap_future(self.engine.worker.submit(self.engine.embed_batch, [it.tokens for it in batch], urgent=True))
                except Exception as e:  # the model failed on this batch: its requests get the error
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(e)
                    continue
                if self.metrics is not None:
                    self.metrics.embedding_batches.inc()
                    self.metrics.batch_tokens.observe(len(batch) * len(batch[0].tokens))
                for it, row in zip(batch, vectors):
                    if not it.future.done():
                        it.future.set_result(row)
