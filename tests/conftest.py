import os

# Must be set before anything imports triton: kernels run on CPU tensors in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from megatron_gem.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    from megatron_gem.testing import make_tiny_llama

    return make_tiny_llama(len(tiny_tokenizer))
