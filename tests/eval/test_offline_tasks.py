"""The offline suite builds as MTEB tasks and runs end to end on tiny checkpoints, deterministically;
eval_mteb.py writes mteb's result files and a summary."""

import json
import os
import subprocess
import sys

import pytest

from megatron_gem.eval import corpora

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (corpora.WORDNET_DIR, corpora.FORTUNES_DIR, corpora.PYTHON_DOC_DIR)),
    reason="needs wordnet-base, fortunes and python3.11-doc (bash tools/install_corpora.sh)",
)

SCALE = 0.03


@pytest.fixture(scope="module")
def gem_checkpoint(tmp_path_factory):
    """A tiny GEM checkpoint: model + tokenizer with 2 GEM tokens + gem_config.json."""
    from megatron_gem import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer

    d = tmp_path_factory.mktemp("gem_ckpt")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    cfg = GEMConfig(num_special_tokens=2)
    add_gem_tokens(model, tok, cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg.save(d)
    return str(d)


def test_suite_builds_with_gold_labels():
    from megatron_gem.eval.tasks import OFFLINE_TASKS, SUITE, offline_tasks

    tasks = offline_tasks(scale=SCALE)
    assert [t.metadata.name for t in tasks] == list(OFFLINE_TASKS)
    for t in tasks:
        t.load_data()
        assert t.metadata.type in SUITE and t.metadata.name in SUITE[t.metadata.type]
    by = {t.metadata.name: t for t in tasks}
    sts = by["SimLex999"].dataset["test"]
    assert len(sts) >= 10 and set(sts.column_names) == {"sentence1", "sentence2", "score"}
    ret = by["PythonFAQ"].dataset["default"]["test"]
    assert len(ret["relevant_docs"]) == len(ret["queries"])
    cls = by["FortunesCategory"].dataset
    assert set(cls["train"]["label"]) == set(cls["test"]["label"]) and len(set(cls["test"]["label"])) == 12
    with pytest.raises(KeyError, match="unknown offline task"):
        offline_tasks(["NoSuchTask"])


def test_suite_is_deterministic():
    from megatron_gem.eval.tasks import offline_tasks

    a, b = offline_tasks(["WordNetDefToExample", "WordNetLexname"], scale=SCALE), offline_tasks(["WordNetDefToExample", "WordNetLexname"], scale=SCALE)
    for x, y in zip(a, b):
        x.load_data()
        y.load_data()
    assert a[0].dataset["default"]["test"]["queries"]["text"] == b[0].dataset["default"]["test"]["queries"]["text"]
    assert a[1].dataset["test"]["text"] == b[1].dataset["test"]["text"]


def test_every_task_runs_on_a_tiny_gem_checkpoint(gem_checkpoint, tmp_path):
    from megatron_gem.eval.mteb_model import load_mteb_model, run_mteb
    from megatron_gem.eval.tasks import OFFLINE_TASKS, offline_tasks

    model = load_mteb_model(gem_checkpoint, "gem", batch_size=8, max_length=64, show_progress_bar=False)
    assert model.mteb_model_meta.name.endswith("-gem") and model.mteb_model_meta.embed_dim == 64
    first = run_mteb(model, offline_tasks(scale=SCALE), str(tmp_path / "a"), show_progress_bar=False)
    assert set(first) == set(OFFLINE_TASKS)
    assert all(-1 <= v <= 1 for v in first.values())
    # Same model, same tasks, fresh output: identical scores.
    again = run_mteb(model, offline_tasks(["SimLex999", "PythonFAQ", "FortunesClustering"], scale=SCALE), str(tmp_path / "b"), show_progress_bar=False)
    assert again == {k: first[k] for k in again}
    files = os.listdir(tmp_path / "a" / "results" / model.mteb_model_meta.model_name_as_path() / model.mteb_model_meta.revision)
    assert {f"{t}.json" for t in OFFLINE_TASKS} <= set(files)


def test_wrapper_dedupes_and_keeps_order(gem_checkpoint):
    """mteb's STS sends repeated texts; each distinct text is embedded once, rows stay in order."""
    from mteb.types import PromptType

    from megatron_gem.eval.mteb_model import wrap_encoder
    from megatron_gem.eval.tasks import offline_tasks

    seen = []

    def enc(texts):
        seen.append(list(texts))
        return [[len(t), 1.0] for t in texts]

    m = wrap_encoder(enc, name="toy", instructions=True)
    meta = offline_tasks(["PythonFAQ"], scale=SCALE)[0].metadata
    out = m.encode([{"text": ["aa", "b", "aa"]}], task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    assert len(seen[0]) == 2 and seen[0][0].startswith("Instruct: ") and seen[0][0].endswith("\nQuery: aa")
    assert out.shape == (3, 2) and out[0, 0] == out[2, 0] != out[1, 0]
    m.encode([{"text": ["doc"]}], task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    assert seen[-1] == ["doc"]  # documents get no instruction


def test_eval_mteb_tool_end_to_end(gem_checkpoint, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "eval_mteb.py"), "--model", gem_checkpoint, "--method", "gem",
         "--tasks", "SimLex999", "WordNetDefToExample", "--scale", str(SCALE), "--output", str(out), "--no-progress", "--max-length", "64",
         "--update-model-card"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    ((name, scores),) = summary.items()
    assert name.endswith("-gem") and set(scores) == {"SimLex999", "WordNetDefToExample"}
    assert "| avg |" in (out / "summary.md").read_text() and name in r.stdout
    # --update-model-card: the same figures, with the command, in the checkpoint's card
    card = open(os.path.join(gem_checkpoint, "README.md")).read()
    assert all(f"| {task} | main_score | {v:.4f} |" in card for task, v in scores.items()), card
    recorded = json.loads(open(os.path.join(gem_checkpoint, "eval_results.json")).read())["mteb"]
    assert recorded["scores"] == {t: {"main_score": v} for t, v in scores.items()} and "--update-model-card" in recorded["command"]


def test_eval_mteb_task_names():
    from megatron_gem.common.errors import InputError
    from tests.launch import load_tool

    eval_mteb = load_tool("eval_mteb")

    names = [t.metadata.name for t in eval_mteb.resolve_tasks(["offline"], SCALE)]
    from megatron_gem.eval.tasks import OFFLINE_TASKS

    assert names == list(OFFLINE_TASKS)
    real = eval_mteb.resolve_tasks(["STSBenchmark", "Lee50DocSim"], SCALE)  # a real MTEB task is looked up, not loaded
    assert [t.metadata.name for t in real] == ["Lee50DocSim", "STSBenchmark"]
    # the held-out check runs by name (outside 'offline', so outside the suite's average)
    assert [t.metadata.name for t in eval_mteb.resolve_tasks(["offline", "GNUInfoSections"], SCALE)] == [*OFFLINE_TASKS, "GNUInfoSections"]
    with pytest.raises(InputError, match="unknown task or benchmark 'NoSuchTaskAnywhere'"):
        eval_mteb.resolve_tasks(["NoSuchTaskAnywhere"], SCALE)
