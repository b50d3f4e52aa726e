import os

# Must be set before anything imports triton: kernels run on CPU tensors in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# The variables a launcher sets (megatron_gem.common.distributed.LAUNCHER_ENV; not imported here:
# it would import torch before the interpreter flag above is read by anything).
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_launcher_env():
    """An in-process main() makes the pytest process a one-process job (RANK, MASTER_PORT, ...).
    Left behind, every later child (a tool, a SLURM job) would inherit that port and collide
    with another job that drew the same free port: restore them after each test."""
    before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from megatron_gem.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    from megatron_gem.testing import make_tiny_llama

    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """A tiny HF checkpoint and a jsonl corpus, written once per session."""
    import json

    from megatron_gem.testing import sample_sentences, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_inputs")
    model = save_tiny_checkpoint(root / "model")
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for s in sample_sentences(300, seed=5):
            f.write(json.dumps({"text": s}) + "\n")
    return {"model": str(model), "data": str(data)}


@pytest.fixture(scope="session")
def gem_hf_checkpoint(tmp_path_factory):
    """A tiny untied HF Llama with the GEM token added by tools/add_gem_tokens.py."""
    from megatron_gem.testing import save_tiny_checkpoint
    from tests.launch import load_tool

    base = tmp_path_factory.mktemp("mg_ckpt")
    save_tiny_checkpoint(base / "base")
    assert load_tool("add_gem_tokens").main(["--input", str(base / "base"), "--output", str(base / "gem")]) == 0
    return base / "gem"


@pytest.fixture(scope="session")
def converted_checkpoint(gem_hf_checkpoint, tmp_path_factory):
    """hf-to-megatron (TP=2, PP=2 target) of gem_hf_checkpoint through the command line."""
    from tests.launch import run_python

    out = tmp_path_factory.mktemp("mg_conv") / "megatron"
    run_python(
        [
            "tools/convert_checkpoint.py",
            "hf-to-megatron",
            "--input",
            str(gem_hf_checkpoint),
            "--output",
            str(out),
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
        ]
    )
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny sentence-transformers folder (random BERT, 32-dim): a distillation teacher."""
    from megatron_gem.testing import save_tiny_sentence_transformer

    return save_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_teacher") / "teacher")


# Summed test seconds per file (pytest --durations=0 of `make test`, 2026-12-07, docs/testing.md
# "Suite time"): a scheduling hint, never asserted. With --dist loadfile each file runs whole on
# one worker, so the last long file to start sets the finish: the Makefile passes
# --no-loadscope-reorder and the files go out longest first, the rest after in collection order.
FILE_SECONDS = {
    "tests/training/test_megatron_engine.py": 202,
    "tests/training/test_megatron_summary.py": 175,
    "tests/slurm/test_slurm_cluster.py": 154,
    "tests/mcore/test_convert.py": 141,
    "tests/training/test_deepspeed_engine.py": 123,
    "tests/training/test_memory_estimate.py": 75,  # measured under load 7 (3 cases: ~120 s); halved for a quiet machine
    "tests/training/test_communication.py": 35,  # the same (2 cases: ~65 s)
    "tests/training/test_megatron_memory.py": 200,  # measured under load 5 (9 cases: 459 s, 2026-12-07, before the PP case measured its stages once); halved for a quiet machine
    "tests/tools/test_convert_checkpoint.py": 62,
    "tests/training/test_reliability.py": 54,
    "tests/eval/test_training_text.py": 48,
    "tests/training/test_summary_mode.py": 39,
    "tests/integrations/test_trainer_ddp.py": 28,
    "tests/kernels/test_triton_gem_attention.py": 28,
    "tests/training/test_collective_device.py": 27,
    "tests/eval/test_lm_harness.py": 27,
    "tests/eval/test_offline_tasks.py": 23,
    "tests/training/test_bad_inputs.py": 18,
    "tests/mcore/test_deepspeed_to_hf.py": 18,
    "tests/data/test_tools.py": 12,
    "tests/integrations/test_hf_trainer.py": 12,
    "tests/serve/test_server.py": 11,
    "tests/serve/test_rag_example.py": 11,
    "tests/integrations/test_megatron_lm.py": 8,
    "tests/kernels/test_backends_agree.py": 8,
    "tests/integrations/test_summary_mode.py": 8,
    "tests/tools/test_bench_summary_step.py": 8,
}


def pytest_collection_modifyitems(config, items):
    def weight(item):
        return -FILE_SECONDS.get(item.nodeid.split("::", 1)[0], 0)

    items.sort(key=weight)  # stable: a file's tests keep their order, unlisted files theirs
