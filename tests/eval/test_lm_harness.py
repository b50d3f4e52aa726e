"""lm-eval on the local MC tasks (a checkpoint path and a live model) and the eval_lm tool."""

import json
import os
import subprocess
import sys

import pytest

from megatron_gem.eval import builders, corpora
from megatron_gem.eval.lm import OFFLINE_MC, prepare_lm_tasks, run_lm_eval

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not os.path.exists(corpora.WORDNET_DIR), reason="needs wordnet-base (bash tools/install_corpora.sh)")


def test_mc_items_are_well_formed_and_deterministic():
    trivia = builders.trivia_mc(50, seed=0)
    assert trivia == builders.trivia_mc(50, seed=0) and trivia != builders.trivia_mc(50, seed=1)
    items = {i.question: i for i in corpora.red_trivia()}
    for it in trivia:
        assert len(it.choices) == 4 == len(set(it.choices))
        src = items[it.question]
        assert it.choices[it.answer] == src.answers[0]
        wrong = [c for j, c in enumerate(it.choices) if j != it.answer]
        assert not {c.lower() for c in wrong} & {a.lower() for a in src.answers}
    answers = [it.answer for it in trivia]
    assert len(set(answers)) > 1  # the correct choice is not always in the same place
    wn = builders.wordnet_definition_mc(30, seed=0)
    assert len(wn) == 30 and all(len(set(i.choices)) == 4 for i in wn)


def test_prepare_writes_yaml_and_data(tmp_path):
    d = prepare_lm_tasks(str(tmp_path), max_items=5)
    for t in OFFLINE_MC:
        yaml_text = (tmp_path / f"{t}.yaml").read_text()
        assert "__DATA_DIR__" not in yaml_text and d in yaml_text
        rows = [json.loads(l) for l in (tmp_path / f"{t}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and all(0 <= r["answer"] < 4 for r in rows)


def test_live_model_and_path_agree(tmp_path, tiny_tokenizer):
    from megatron_gem.testing import make_tiny_llama, save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "ckpt")
    live = make_tiny_llama(len(tiny_tokenizer))
    kw = dict(tasks=["gem_wordnet_def_mc", "perplexity"], max_items=12, perplexity_texts=6, batch_size=4, show_progress_bar=False)
    a = run_lm_eval(path, work_dir=str(tmp_path / "a"), **kw)
    b = run_lm_eval(live, tiny_tokenizer, work_dir=str(tmp_path / "b"), **kw)
    assert set(a) == {"gem_wordnet_def_mc", "perplexity"}
    assert 0 <= a["gem_wordnet_def_mc"]["acc"] <= 1
    assert a["gem_wordnet_def_mc"]["acc"] == b["gem_wordnet_def_mc"]["acc"]
    assert a["perplexity"]["perplexity"] == pytest.approx(b["perplexity"]["perplexity"], rel=1e-4)


def test_eval_lm_tool(tmp_path):
    from megatron_gem.testing import save_tiny_checkpoint
    from tests.launch import load_tool

    plain = save_tiny_checkpoint(tmp_path / "ckpt")
    path = str(tmp_path / "gem")  # a GEM export (tokens added): its model card takes the figures
    assert load_tool("add_gem_tokens").main(["--input", plain, "--output", path]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    tool = [sys.executable, os.path.join(REPO, "tools", "eval_lm.py")]
    cmd = tool + ["--model", path, "--output", str(tmp_path / "out"), "--update-model-card"]
    r = subprocess.run(cmd + ["--tasks", "gem_trivia_mc", "--max-items", "8"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "lm_results.json").read_text())["results"]
    assert 0 <= res["gem_trivia_mc"]["acc"] <= 1 and "gem_trivia_mc acc" in r.stdout
    assert f"| gem_trivia_mc | acc | {res['gem_trivia_mc']['acc']:.4f} |" in open(os.path.join(path, "README.md")).read()
    # A plain HF checkpoint has no card to update: refused before any evaluation.
    r = subprocess.run(tool + ["--model", plain, "--output", str(tmp_path / "o2"), "--update-model-card"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "no gem_config.json" in r.stderr and not os.path.exists(tmp_path / "o2")


def test_unknown_task_is_refused(tmp_path, tiny_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval(tiny_llama, tiny_tokenizer, tasks=["gem_trivia_mc", "no_such_task_xyz"], work_dir=str(tmp_path), max_items=4)
