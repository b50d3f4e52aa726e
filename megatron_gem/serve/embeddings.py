"""POST /v1/embeddings: OpenAI's embeddings endpoint over the served GEM model.

Each input is embedded as GEMEmbedder.encode embeds it: the text tokenised (BOS included), the
named prompt prepended first if asked (``prompt_name``, or ``input_type="query"``), wrapped in
the model's embed template, K summary tokens appended, the mean of their last-layer states,
L2-normalised (float32). Token-array inputs are taken as the tokenizer's ids of the text
(``tokenizer(text)["input_ids"]``, BOS included where the tokenizer adds one) and get the
template and summary tokens the same way.

A text longer than ``max_input_tokens`` (template and summary tokens included) is refused (400)
unless the server runs with auto_truncate, which cuts the text and never the template
(text-embeddings-inference's choice: truncation is explicit, never silent).
"""

from __future__ import annotations

import base64

import numpy as np

from .api_errors import bad_request
from .protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


class EmbeddingService:
    def __init__(self, engine, batcher, config, metrics=None):
        self.engine = engine
        self.batcher = batcher
        self.config = config
        self.metrics = metrics

    def _prompt(self, req: EmbeddingRequest) -> str:
        prompts = self.engine.embedder.prompts
        if req.prompt_name is not None:
            if req.prompt_name not in prompts:
                raise bad_request(
                    f"prompt_name={req.prompt_name!r}: this model has the prompts {sorted(prompts)} (gem_config.json query_prompt)", param="prompt_name"
                )
            return prompts[req.prompt_name]
        if req.input_type == "query":
            return prompts.get("query", "")  # a model trained without a query prompt embeds queries as they are
        return ""

    def inputs(self, req: EmbeddingRequest) -> list[list[int]]:
        """The wrapped token ids of every input, checked (400 naming the input and the limit)."""
        raw = req.input
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise bad_request("input is empty: give a string, a list of strings, or token arrays", param="input")
        cap = self.config.max_client_batch_size
        if len(raw) > cap:
            raise bad_request(f"input has {len(raw)} items; at most {cap} per request (--max-client-batch-size): split the request", param="input")
        prompt = self._prompt(req)
        vocab = len(self.engine.tokenizer)
        token_lists = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                if not item:
                    raise bad_request(f"input[{i}] is an empty string: nothing to embed", param="input")
                token_lists.append(self.engine.tokenizer(prompt + item, add_special_tokens=True)["input_ids"])
            else:
                if not item:
                    raise bad_request(f"input[{i}] is an empty token array", param="input")
                bad = [t for t in item if not 0 <= t < vocab]
                if bad:
                    raise bad_request(f"input[{i}] holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="input")
                if prompt:
                    raise bad_request("prompt_name / input_type='query' apply to string inputs only (token arrays are embedded as given)", param="input")
                token_lists.append(list(item))
        limit = self.config.max_input_tokens
        wrapped = self.engine.wrap_token_ids(token_lists, limit)
        if not self.config.auto_truncate:
            for i, ((_ids, cut), toks) in enumerate(zip(wrapped, token_lists)):
                if cut:
                    total = len(toks) + self.engine.embedder.template.extra + len(self.engine.embedder.special_ids)
                    raise bad_request(
                        f"input[{i}] needs {total} tokens (with the embed template and summary tokens); the limit is {limit} (--max-input-tokens). "
                        "Shorten it, or start the server with --auto-truncate to cut long texts",
                        param="input",
                        code="context_length_exceeded",
                    )
        return [ids for ids, _ in wrapped]

    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        if req.dimensions is not None and req.dimensions != self.engine.embedder.model.config.hidden_size:
            raise bad_request(
                f"dimensions={req.dimensions}: this model's embeddings have {self.engine.embedder.model.config.hidden_size} dimensions", param="dimensions"
            )
        token_lists = self.inputs(req)
        vectors = await self.batcher.embed(token_lists)
        n_tokens = sum(len(t) for t in token_lists)
        if self.metrics is not None:
            self.metrics.embedded_texts.inc(len(token_lists))
            self.metrics.prompt_tokens.labels("embeddings").inc(n_tokens)
        data = [Embedding(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=self.engine.name, usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))


def encode_vector(vector, encoding_format: str):
    """A float32 vector as OpenAI sends it: a list of floats, or base64 of its little-endian bytes."""
    arr = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(arr.tobytes()).decode("ascii")
    return arr.tolist()
