"""POST /v1/chat/completions: OpenAI's chat endpoint over the served model, streaming (SSE) or
not, plus the ``return_embedding`` extension.

``return_embedding``: the embedding of the user's message, read from the prefill that the answer
was computed from: after ``generate`` the KV cache holds the prompt's keys and values, and K
summary steps over it (GEMEmbedder.embed_from_cache) give the embedding: no second pass over
the text. That vector equals ``/v1/embeddings`` of the message (and GEMEmbedder.encode) when
the prompt is exactly the embedded text, which holds for a model trained with the chat template
as its embed template (``--gem-embed-template chat``) and a conversation of one user message:
the prompt is then built by that template (gem/template.py), as training and encode build it.
Anything else is refused with a 400 that says so, rather than answered with a vector that
matches nothing in an index.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse

from .api_errors import APIError, bad_request
from .embeddings import encode_vector
from .generation import Answer
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
)


def wire(obj) -> dict:
    """A response model as JSON for the wire: OpenAI's fields as they are (``null`` included),
    the extensions (``embedding``) and the stream's unset ``usage`` and delta fields left out."""
    data = obj.model_dump(mode="json")
    for key in ("embedding", "usage"):
        if key in data and data[key] is None:
            del data[key]
    for choice in data.get("choices", []):
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


def sse(payload) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(wire(payload))}\n\n"


def sse_error(err: Exception) -> str:
    body = err.body() if isinstance(err, APIError) else {"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None, "code": None}}
    return sse(json.dumps(body))


class ChatService:
    def __init__(self, engine, runner, config, metrics=None):
        self.engine = engine
        self.runner = runner
        self.config = config
        self.metrics = metrics

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not req.return_embedding:
            return self.engine.chat_prompt_ids(messages)
        if not self.engine.chat_template_embeds:
            raise bad_request(
                f"return_embedding needs a model whose embed template is its chat template (trained with --gem-embed-template chat); this model's is "
                f"{self.engine.config.embed_template!r}, so the chat prompt's prefill is not the text its embeddings read",
                param="return_embedding",
            )
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise bad_request(
                "return_embedding reads the embedding of a conversation of one user message (the chat template around it is what the model embeds); "
                f"got roles {[m['role'] for m in messages]}",
                param="messages",
            )
        ids, cut = self.engine.wrap_texts([messages[0]["content"]], self.config.max_input_tokens)[0]
        if cut:
            raise bad_request(
                f"return_embedding: the message is longer than the embedding limit of {self.config.max_input_tokens} tokens (--max-input-tokens)",
                param="messages",
                code="context_length_exceeded",
            )
        return ids

    async def create(self, req: ChatCompletionRequest):
        prompt = self.prompt_ids(req)
        params = self.runner.params(req, req.token_limit, len(prompt))
        gen = self.runner.start(prompt, params, return_embedding=req.return_embedding)
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels("chat").inc(len(prompt))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            answer = await gen.answer()
            return ChatCompletionResponse(
                id=rid,
                created=created,
                model=self.engine.name,
                choices=[ChatChoice(message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)],
                usage=answer.usage(),
                embedding=self._embedding(answer),
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: ChatDelta, **kw) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=self.engine.name, choices=[ChatChunkChoice(delta=delta, **kw)]))

        async def events():
            try:
                yield chunk(ChatDelta(role="assistant", content=""))
                async for item in gen.events():
                    if isinstance(item, Answer):
                        last = ChatCompletionChunk(
                            id=rid,
                            created=created,
                            model=self.engine.name,
                            choices=[ChatChunkChoice(delta=ChatDelta(), finish_reason=item.finish_reason)],
                            embedding=self._embedding(item),
                        )
                        yield sse(last)
                        if include_usage:
                            yield sse(ChatCompletionChunk(id=rid, created=created, model=self.engine.name, choices=[], usage=item.usage()))
                    else:
                        yield chunk(ChatDelta(content=item))
            except Exception as e:  # the stream has started: the error goes in the stream
                yield sse_error(e)
            finally:
                gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _embedding(self, answer: Answer):
        if answer.embedding is None:
            return None
        if self.metrics is not None:
            self.metrics.prefill_embeddings.inc()
        return encode_vector(answer.embedding, "float")
