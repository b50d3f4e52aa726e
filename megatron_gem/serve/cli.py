"""``megatron-gem serve MODEL_DIR`` (also ``python -m megatron_gem.serve MODEL_DIR``): load the
model once and serve it over HTTP with uvicorn (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ServeConfig


def build_parser(prog: str = "megatron-gem serve") -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog=prog, description="Serve a GEM model: OpenAI-compatible embeddings and chat/text completions from one copy of the weights."
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a GEM export (train.py's hf/ folder), or a summary-mode adapter folder (its base is loaded with it)")
    p.add_argument(
        "--base", default=None, help="summary-mode adapter folders: the base checkpoint directory (default: the folder's base/ or gem_config.json base_model)"
    )
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only; the server has no TLS)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--api-key", default=os.environ.get("GEM_API_KEY"), help="require 'Authorization: Bearer KEY' on /v1 requests (default: $GEM_API_KEY, else none)"
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL_DIR's folder name)")
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens, help="tokens per embedded text, template and summary tokens included")
    p.add_argument("--auto-truncate", action="store_true", help="cut texts over --max-input-tokens (the text, never the template) instead of answering 400")
    p.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size, help="inputs per /v1/embeddings request")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per embedding forward")
    p.add_argument("--max-batch-requests", type=int, default=d.max_batch_requests, help="texts per embedding forward")
    p.add_argument("--max-queued-texts", type=int, default=d.max_queued_texts, help="texts waiting or running; more gets 429")
    p.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="largest max_tokens a completion may ask for (above: 400)")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help=f"max_tokens of a chat completion that gives none (default {d.default_max_tokens}, or the cap when lower)",
    )
    p.add_argument("--max-queued-generations", type=int, default=d.max_queued_generations, help="completions waiting or running; more gets 429")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + answer tokens (default: the model's max_position_embeddings)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def config_from_args(args) -> ServeConfig:
    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_name=args.served_model_name,
        max_input_tokens=args.max_input_tokens,
        auto_truncate=args.auto_truncate,
        max_client_batch_size=args.max_client_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        max_queued_texts=args.max_queued_texts,
        max_tokens_cap=args.max_tokens_cap,
        default_max_tokens=args.default_max_tokens if args.default_max_tokens is not None else min(ServeConfig.default_max_tokens, args.max_tokens_cap),
        max_queued_generations=args.max_queued_generations,
        max_model_len=args.max_model_len,
    )
    cfg.validate()
    return cfg


def main(argv=None, prog: str = "megatron-gem serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e).replace("_", "-"))
    if not os.path.isdir(args.model_dir):
        parser.error(f"MODEL_DIR {args.model_dir}: not a directory")
    from .worker import bound_malloc_arenas

    bound_malloc_arenas()  # before torch and uvicorn start their threads
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch anything at load time

    import uvicorn

    from ..common.errors import ModelLoadError
    from .app import create_app
    from .engine import GEMEngine

    try:
        engine = GEMEngine.load(args.model_dir, base=args.base, max_input_tokens=config.max_input_tokens, name=config.served_model_name)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"megatron-gem serve: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, config)
    logging.getLogger("megatron_gem.serve").info(
        "serving %s (%s mode, embed template %r) on http://%s:%d", engine.name, engine.config.train_mode, engine.config.embed_template, config.host, config.port
    )
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
