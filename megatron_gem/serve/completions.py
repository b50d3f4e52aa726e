"""POST /v1/completions: OpenAI's (legacy) text completion endpoint, streaming (SSE) or not. The
prompt is the text as the tokenizer reads it (BOS included where it adds one), or token ids."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import StreamingResponse

from .api_errors import bad_request
from .chat import sse, sse_error
from .generation import Answer
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse


class CompletionService:
    def __init__(self, engine, runner, config, metrics=None):
        self.engine = engine
        self.runner = runner
        self.config = config
        self.metrics = metrics

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return self.engine.tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
        vocab = len(self.engine.tokenizer)
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="prompt")
        return list(req.prompt)

    async def create(self, req: CompletionRequest):
        prompt = self.prompt_ids(req)
        params = self.runner.params(req, req.max_tokens, len(prompt))
        gen = self.runner.start(prompt, params)
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels("completions").inc(len(prompt))
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.engine.name
        if not req.stream:
            answer = await gen.answer()
            return CompletionResponse(
                id=rid, created=created, model=name, choices=[CompletionChoice(text=answer.text, finish_reason=answer.finish_reason)], usage=answer.usage()
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            try:
                async for item in gen.events():
                    if isinstance(item, Answer):
                        yield sse(
                            CompletionResponse(id=rid, created=created, model=name, choices=[CompletionChoice(text="", finish_reason=item.finish_reason)])
                        )
                        if include_usage:
                            yield sse(CompletionResponse(id=rid, created=created, model=name, choices=[], usage=item.usage()))
                    else:
                        yield sse(CompletionResponse(id=rid, created=created, model=name, choices=[CompletionChoice(text=item, finish_reason=None)]))
            except Exception as e:
                yield sse_error(e)
            finally:
                gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
