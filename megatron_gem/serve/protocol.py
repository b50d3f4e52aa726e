"""Request and response shapes of the OpenAI API, as typed pydantic models, field for field for
what this server implements. Extensions are clearly named extra fields and change no OpenAI
field's meaning:

- embeddings: ``prompt_name`` (a named prompt of the model, e.g. "query": the instruction
  training prepended to queries, gem_config.json query_prompt) and ``input_type`` ("query" or
  "document", as other embedding APIs name it: "query" means ``prompt_name="query"``);
- chat completions: ``return_embedding`` (the embedding of the user message, read from the
  prefill computed for the answer: docs/serving.md), answered as ``embedding`` beside
  ``choices``.

OpenAI fields this server does not implement are either accepted at their neutral value
(``n=1``, ``presence_penalty=0``, ``logprobs=false``, ``user``) or refused by name; an unknown
field is refused (a misspelt ``max_token`` must not be ignored without a word).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- embeddings ----

EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extensions.
    prompt_name: str | None = None
    input_type: Literal["query", "document"] | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if self.prompt_name is not None and self.input_type is not None:
            raise ValueError("give prompt_name or input_type, not both")
        return self


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- shared by chat and text completions ----


class _Sampling(_Request):
    """Sampling fields of both completion endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"n={v}: this server returns one choice per request (n=1)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0.0:
            raise ValueError("presence_penalty / frequency_penalty are not implemented here; leave them at 0")
        return v

    @model_validator(mode="after")
    def _usage_only_when_streaming(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ---- chat completions ----


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    # Extension: the embedding of the (one) user message, read from the answer's prefill.
    return_embedding: bool = False

    @model_validator(mode="after")
    def _one_length(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    embedding: list[float] | None = None  # extension: return_embedding


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    embedding: list[float] | None = None  # extension: on the chunk that carries finish_reason


# ---- text completions ----


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError(f"prompt: a list of {len(v)} prompts; this server completes one prompt per request")
            v = v[0]
        if isinstance(v, (str, list)) and not v:
            raise ValueError("prompt is empty")
        return v


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models ----


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "megatron-gem"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_Sampling.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
