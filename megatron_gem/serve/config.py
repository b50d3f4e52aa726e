"""ServeConfig: the server's limits and switches, one dataclass (the command line's flags,
cli.py; tests build it directly). Defaults follow text-embeddings-inference where it has one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    # Where it listens: loopback unless told otherwise (the server has no TLS).
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer key every /v1 request must carry (None: no key; /health and /metrics stay open).
    api_key: str | None = None
    # The name clients send as "model" (default: the model folder's name).
    served_model_name: str | None = None
    # Embeddings: tokens per text (template and summary tokens included); longer texts are refused
    # (400) unless auto_truncate, which cuts the text (never the template) as GEMEmbedder.encode does.
    max_input_tokens: int = 512
    auto_truncate: bool = False
    max_client_batch_size: int = 32  # inputs per /v1/embeddings request
    max_batch_tokens: int = 4096  # padded tokens per forward (the longest text x the texts): the KV cache of the prefill is held for the readout
    max_batch_requests: int = 256  # texts per forward
    max_queued_texts: int = 1024  # texts waiting or running; past it a request gets 429
    # Generation: max_tokens above the cap is refused (400); at most max_queued_generations
    # completions wait or run (they run one at a time, each one model.generate call); past it 429.
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    max_queued_generations: int = 16
    # Prompt + answer must fit here (default: the model config's max_position_embeddings).
    max_model_len: int | None = None

    def validate(self) -> None:
        for name in ("max_input_tokens", "max_client_batch_size", "max_batch_tokens", "max_batch_requests", "max_queued_texts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_tokens_cap", "default_max_tokens", "max_queued_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_cap={self.max_tokens_cap}")
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} is below max_input_tokens={self.max_input_tokens}: the longest text would fit no batch")
        if self.max_queued_texts < self.max_client_batch_size:
            raise ValueError(f"max_queued_texts={self.max_queued_texts} is below max_client_batch_size={self.max_client_batch_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is not a TCP port")
