"""A sliding-window model (Mistral's config) behind the server: its own generate cache keeps only
the last window of keys, so the engine hands the prefill and ``return_embedding``'s generate a
cache of full-length layers. The embeddings equal GEMEmbedder's on texts longer than the window,
and the answer is the one generate gives without return_embedding."""

import pytest
import torch

TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the woods"


@pytest.fixture(scope="module")
def swa_engine(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.export import export_hf
    from megatron_gem.integrations.enable import disable_gem, enable_gem
    from megatron_gem.serve.engine import GEMEngine
    from megatron_gem.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=3, use_cache=False,
    )  # fmt: skip
    model = MistralForCausalLM(cfg)
    gem = GEMConfig(num_special_tokens=1)
    enable_gem(model, tok, gem, backend="sdpa")
    with torch.no_grad():
        model.get_input_embeddings().weight[gem.special_token_ids] += 0.5 * torch.randn(1, 64)
    disable_gem(model)
    folder = tmp_path_factory.mktemp("swa")
    export_hf(model, tok, gem, str(folder))
    engine = GEMEngine.load(str(folder))
    yield engine
    engine.stop()


def test_embeddings_of_texts_longer_than_the_window(swa_engine):
    tokens = swa_engine.embedder.text_tokens([TEXT, TEXT[:30]])
    assert len(tokens[0]) > 4 * swa_engine.embedder.model.config.sliding_window
    ref = swa_engine.embedder.encode_token_ids(tokens)
    torch.testing.assert_close(swa_engine.embed_batch(tokens), ref, rtol=0, atol=1e-5)


def test_return_embedding_reads_the_whole_prompt(swa_engine):
    from megatron_gem.serve.engine import SamplingParams

    prompt = swa_engine.embedder.text_tokens([TEXT])[0]
    params = SamplingParams(max_new_tokens=4, temperature=0)
    with_emb = swa_engine.generate(prompt, params, None, return_embedding=True)
    plain = swa_engine.generate(prompt, params, None)
    assert with_emb["ids"] == plain["ids"] and plain["embedding"] is None
    torch.testing.assert_close(with_emb["embedding"], swa_engine.embedder.encode_token_ids([prompt])[0], rtol=0, atol=1e-5)
