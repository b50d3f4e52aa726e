"""An OpenAI-compatible server for one GEM model (docs/serving.md): /v1/embeddings and
/v1/chat/completions, /v1/completions from one copy of the weights, the query's embedding read
from the chat prefill on request (``return_embedding``). ``megatron-gem serve MODEL_DIR``."""

from .app import create_app
from .config import ServeConfig
from .engine import GEMEngine
