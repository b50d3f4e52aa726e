"""Tiny offline models and tokenizers for tests, benchmarks and smoke runs.

Nothing here downloads: the tokenizer is a small BPE trained on generated sentences, the model
a randomly initialised Llama built from a config. The code paths that use them are the ones
users run with real checkpoints.
"""

from __future__ import annotations

import os
import random

_WORDS = (
    "the a one two cat dog bird fish tree river stone light dark cold warm fast slow red blue "
    "green old new small large city road house garden book song water fire wind rain sun moon "
    "runs sleeps sings reads writes sees finds makes takes gives holds eats drinks walks flies "
    "under over near behind before after with without from into because while when where why "
    "model token vector summary embedding attention layer train learn data text word meaning"
).split()


def sample_sentences(n: int, seed: int = 0, min_words: int = 4, max_words: int = 24) -> list[str]:
    """Deterministic pseudo-sentences over a fixed vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(_WORDS) for _ in range(k)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def make_tiny_tokenizer(vocab_size: int = 320):
    """A Llama-like fast tokenizer (BOS added, EOS and PAD defined) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_sentences(2000, seed=1234), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def make_tiny_llama(vocab_size: int, *, tie_word_embeddings: bool = False, seed: int = 0, **overrides):
    """A 2-layer random Llama (GQA 4 query / 2 key-value heads) for tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def save_tiny_checkpoint(directory: str | os.PathLike, *, tie_word_embeddings: bool = False, seed: int = 0) -> str:
    """Write a tiny HF checkpoint (safetensors + tokenizer) that from_pretrained loads."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), tie_word_embeddings=tie_word_embeddings, seed=seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def save_tiny_gem_export(directory: str | os.PathLike, k: int = 1, *, seed: int = 0, row_noise: float = 0.5, embed_template: str = "", **overrides) -> str:
    """A tiny full-mode GEM export (hf.export.export_hf) with K GEM tokens whose embedding rows
    are the mean plus ``row_noise`` * N(0, 1) (a readout of another token then shows).
    ``overrides``: LlamaConfig fields (make_tiny_llama)."""
    import torch

    from .gem.config import GEMConfig
    from .hf.export import export_hf
    from .integrations.enable import disable_gem, enable_gem

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=seed, **overrides)
    config = GEMConfig(num_special_tokens=k, embed_template=embed_template)
    enable_gem(model, tok, config, backend="sdpa")
    with torch.no_grad():
        model.get_input_embeddings().weight[config.special_token_ids] += row_noise * torch.randn(k, model.config.hidden_size)
    disable_gem(model)
    export_hf(model, tok, config, str(directory))
    return str(directory)


RESERVED_TOKENS = ("<|reserved_0|>", "<|reserved_1|>")


def save_tiny_reserved_base(directory: str | os.PathLike, *, seed: int = 0, **overrides) -> str:
    """A tiny base checkpoint whose tokenizer has unused reserved special tokens (like
    Llama-3's), which summary mode picks as its summary tokens. ``overrides``: LlamaConfig
    fields (make_tiny_llama)."""
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(RESERVED_TOKENS)})
    model = make_tiny_llama(len(tok), seed=seed, **overrides)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def tiny_summary_model(base_dir: str, k: int, *, seed: int = 0, positions: str = "special"):
    """(lm, tokenizer, config, adapter): the base at ``base_dir`` with a summary adapter whose
    lora_B is random (a fresh adapter is exactly the base model; this one looks trained)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gem.config import GEMConfig
    from .gem.tokens import summary_token_ids
    from .hf.summary import attach_summary_adapter

    tok = AutoTokenizer.from_pretrained(base_dir)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = GEMConfig(train_mode="summary", num_special_tokens=k, adapter_rank=4, adapter_alpha=8.0, adapter_positions=positions)
    summary_token_ids(tok, config)
    adapter = attach_summary_adapter(lm, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in adapter.deltas.values():
            delta.lora_B.copy_(0.5 * torch.randn(delta.lora_B.shape, generator=gen))
    return lm, tok, config, adapter


def save_tiny_sentence_transformer(directory: str | os.PathLike, *, seed: int = 0, hidden_size: int = 32) -> str:
    """A tiny sentence-transformers folder (random 2-layer BERT over a word-level vocabulary of
    the sample sentences, mean pooling, normalisation; safetensors) that distill.Teacher loads:
    a distillation teacher for tests, with an embedding size unlike the student's."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", ":"] + sorted(set(_WORDS))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=os.path.join(tmp, "vocab.txt"), do_lower_case=True)
        torch.manual_seed(seed)
        bert = BertModel(
            BertConfig(
                vocab_size=len(vocab),
                hidden_size=hidden_size,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=2 * hidden_size,
                max_position_embeddings=128,
            )
        )
        bert_dir = os.path.join(tmp, "bert")
        bert.save_pretrained(bert_dir, safe_serialization=True)
        tok.save_pretrained(bert_dir)
        word = Transformer(bert_dir, max_seq_length=64)
        model = SentenceTransformer(modules=[word, Pooling(hidden_size, "mean"), Normalize()], device="cpu")
        model.save(str(directory), safe_serialization=True)
    return str(directory)
