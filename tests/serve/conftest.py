"""Tiny served models (megatron_gem.testing): a summary-mode adapter folder whose embed template
is the chat template (K = 2), its base, and a full-mode export (K = 1, PromptEOL-style template)."""

import pytest

# The tiny tokenizer has no chat template: a ChatML-like one whose turns are separated by
# newlines (a boundary the byte-level pre-tokenizer splits at, as real chat templates do).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FULL_TEMPLATE = 'This text : "{text}" means:'


def _with_chat_template(directory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory):
    import torch

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.hf.export import export_summary_adapter
    from megatron_gem.testing import make_tiny_llama, save_tiny_reserved_base, tiny_summary_model

    root = tmp_path_factory.mktemp("serve_models")
    base = save_tiny_reserved_base(root / "base", seed=3)
    _with_chat_template(base)
    lm, tok, cfg, adapter = tiny_summary_model(base, 2, seed=1)
    cfg.embed_template = "chat"
    cfg.query_prompt = "query: "
    summary = export_summary_adapter(lm, adapter, tok, cfg, str(root / "summary"), base_path=base)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    full_lm = make_tiny_llama(len(tok), seed=5)
    full_cfg = GEMConfig(num_special_tokens=1, embed_template=FULL_TEMPLATE)
    add_gem_tokens(full_lm, tok, full_cfg)
    with torch.no_grad():
        full_lm.get_input_embeddings().weight[full_cfg.special_token_ids] += 0.5
    full = root / "full"
    full_lm.save_pretrained(full)
    tok.save_pretrained(full)
    full_cfg.save(full)
    return {"base": str(base), "summary": str(summary), "full": str(full)}


@pytest.fixture(scope="session")
def summary_engine(serve_models):
    from megatron_gem.serve import GEMEngine

    engine = GEMEngine.load(serve_models["summary"], name="summary")
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def full_engine(serve_models):
    from megatron_gem.serve import GEMEngine

    engine = GEMEngine.load(serve_models["full"], name="full")
    yield engine
    engine.stop()


def client(engine, **config):
    """A TestClient (the app's lifespan runs) over ``engine`` with ServeConfig(**config)."""
    from fastapi.testclient import TestClient

    from megatron_gem.serve import ServeConfig, create_app

    return TestClient(create_app(engine, ServeConfig(served_model_name=engine.name, **config)))
