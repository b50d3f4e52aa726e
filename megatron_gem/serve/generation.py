"""Generation for the chat and text completion endpoints: admission to a bounded queue, one
``model.generate`` call per answer on the model worker, the answer streamed as text.

What is taken from transformers serve (transformers/cli/serving, our pinned transformers): its
``DirectStreamer`` (the ``generate`` streamer that decodes tokens incrementally with the
tokenizers library's DecodeStream, pushes text to an asyncio queue, and aborts ``generate`` at
its next token once cancelled), and its default design of one ``model.generate`` per request on
a persistent inference thread. Not taken: its continuous batching, whose sampling settings are
shared by every request (no per-request temperature, top_p or seed) and whose paged KV cache
hides the prefill that ``return_embedding`` reads; and its handlers, which are tied to its model
manager and know neither embeddings nor our limits and errors.

``stop`` sequences end generation through ``generate``'s stop_strings; as in OpenAI's API the
returned text ends before the stop sequence (``StopTrimmer`` holds back streamed text that
could be the start of one).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .api_errors import bad_request, overloaded, unavailable
from .engine import SamplingParams
from .protocol import Usage

_FINISHED = object()  # end of a job's queue, pushed after generate returned or failed


class StopTrimmer:
    """Text before the first stop sequence, fed piece by piece."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """What may be emitted now."""
        if self.stopped:
            return ""
        self.buffer += text
        cut = first_stop(self.buffer, self.stops)
        if cut is not None:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        keep = len(self.buffer) - self.hold
        out, self.buffer = (self.buffer[:keep], self.buffer[keep:]) if keep > 0 else ("", self.buffer)
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _streamer_class():
    from transformers.cli.serving.utils import DirectStreamer

    class Streamer(DirectStreamer):
        """DirectStreamer that also lets queued embedding batches run between decode steps."""

        def __init__(self, tokenizer, loop, queue, worker):
            super().__init__(tokenizer._tokenizer, loop, queue)
            self._worker = worker

        @property
        def cancelled(self) -> bool:
            return self._cancelled.is_set()

        def put(self, value) -> None:
            super().put(value)
            self._worker.drain_urgent()

    return Streamer


@dataclass
class Answer:
    text: str
    ids: list[int]
    prompt_tokens: int
    finish_reason: str
    embedding: object = None  # torch.Tensor [hidden] with return_embedding

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.ids), total_tokens=self.prompt_tokens + len(self.ids))


class GenerationRunner:
    """Admission and execution of completions. At most ``max_queued`` answers wait or run;
    past that a request gets 429 at once."""

    def __init__(self, engine, *, max_queued: int, max_tokens_cap: int, default_max_tokens: int, max_model_len: int | None = None, metrics=None):
        self.engine = engine
        self.max_model_len = max_model_len or engine.max_model_len
        self.max_queued = max_queued
        self.max_tokens_cap = max_tokens_cap
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics
        self.active = 0
        self._streamer_cls = _streamer_class()

    def params(self, req, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        """Sampling settings of a request, checked against the caps (400 with the reason)."""
        n = self.default_max_tokens if max_tokens is None else max_tokens
        if n > self.max_tokens_cap:
            raise bad_request(f"max_tokens={n} is above this server's cap of {self.max_tokens_cap} (--max-tokens-cap)", param="max_tokens")
        limit = self.max_model_len
        if prompt_len + n > limit:
            raise bad_request(
                f"the prompt has {prompt_len} tokens and max_tokens is {n}: together above the model's {limit} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens" if prompt_len < limit else "messages",
            )
        return SamplingParams(max_new_tokens=n, temperature=req.temperature, top_p=req.top_p, stop=list(req.stop or []), seed=req.seed)

    def start(self, prompt_ids: list[int], params: SamplingParams, *, return_embedding: bool = False) -> "Generation":
        """Admit (429 when full, 503 when the worker is down) and queue one answer on the worker."""
        if not self.engine.worker.alive:
            raise unavailable("the model worker is not running")
        if self.active >= self.max_queued:
            raise overloaded(f"{self.active} completions are waiting or running (the limit is {self.max_queued}, --max-queued-generations)")
        self.active += 1
        self._gauge()
        try:
            return Generation(self, prompt_ids, params, return_embedding)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self.active -= 1
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels("generation").set(self.active)


class Generation:
    """One admitted answer: its job is on the worker from construction on; ``events`` yields
    its text pieces, then the Answer. The slot is freed when the job ends; ``cancel`` (or
    leaving ``events`` early: a client gone) stops ``generate`` at its next token, or drops the
    job if it has not started."""

    def __init__(self, runner: GenerationRunner, prompt_ids: list[int], params: SamplingParams, return_embedding: bool):
        self.runner, self.prompt_ids, self.params = runner, prompt_ids, params
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        engine = runner.engine
        self.streamer = streamer = runner._streamer_cls(engine.tokenizer, loop, self.queue, engine.worker)
        queue = self.queue

        def job():
            try:
                if streamer.cancelled:
                    return None
                return engine.generate(prompt_ids, params, streamer, return_embedding=return_embedding)
            except Exception:
                if streamer.cancelled:  # generate aborted by the cancelled streamer
                    if runner.metrics is not None:
                        runner.metrics.cancelled.inc()
                    return None
                raise
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _FINISHED)

        self.future = engine.worker.submit(job)
        self.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(runner._release))

    def cancel(self) -> None:
        self.streamer.cancel()
        self.future.cancel()  # still queued: it never runs

    async def events(self):
        engine, params = self.runner.engine, self.params
        trimmer = StopTrimmer(params.stop)
        finished = False
        try:
            while True:
                item = await self.queue.get()
                if item is _FINISHED:
                    finished = True
                    break
                if isinstance(item, str):
                    piece = trimmer.feed(item)
                    if piece:
                        yield piece
            result = await asyncio.wrap_future(self.future)
            if result is None:  # cancelled
                return
            tail = trimmer.finish()
            if tail:
                yield tail
            ids = result["ids"]
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, params.stop)
            text = text[:cut] if cut is not None else text
            ended = bool(ids) and ids[-1] in engine.eos_ids
            reason = "stop" if cut is not None or trimmer.stopped or ended or len(ids) < params.max_new_tokens else "length"
            if self.runner.metrics is not None:
                self.runner.metrics.generated_tokens.labels("generation").inc(len(ids))
            yield Answer(text=text, ids=ids, prompt_tokens=len(self.prompt_ids), finish_reason=reason, embedding=result["embedding"])
        finally:
            if not finished:
                self.cancel()

    async def answer(self) -> Answer:
        """The whole answer (non-streaming)."""
        async for item in self.events():
            if isinstance(item, Answer):
                return item
        raise RuntimeError("generation ended without an answer")
