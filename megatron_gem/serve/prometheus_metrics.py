"""Prometheus metrics of one server (prometheus_client, a registry per app so that several apps
in one process, as in tests, do not collide). Served at GET /metrics in the text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gem_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "gem_request_latency_seconds", "time from request to the last byte of the answer", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("gem_queue_depth", "work waiting or running: embedding texts, generation requests", ["queue"], registry=r)
        self.prompt_tokens = Counter("gem_prompt_tokens", "tokens read (embedded texts, prompts)", ["endpoint"], registry=r)
        self.generated_tokens = Counter("gem_generated_tokens", "tokens generated", ["endpoint"], registry=r)
        self.cancelled = Counter("gem_generations_cancelled", "answers stopped early because their client went away", registry=r)
        self.embedded_texts = Counter("gem_embedded_texts", "texts embedded through /v1/embeddings", registry=r)
        self.prefill_embeddings = Counter("gem_prefill_embeddings", "embeddings read from a chat prefill (return_embedding)", registry=r)
        self.embedding_batches = Counter("gem_embedding_batches", "embedding forwards run", registry=r)
        self.batch_tokens = Histogram(
            "gem_embedding_batch_tokens", "padded tokens per embedding forward", buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768), registry=r
        )
        self.queue_depth.labels("embeddings").set(0)
        self.queue_depth.labels("generation").set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
