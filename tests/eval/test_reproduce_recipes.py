"""tools/reproduce.py: every recipe is a valid train.py command line; existing recipes keep their meaning."""

import importlib.util
import os

from megatron_gem.training.args import build_parser, validate_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_tool", os.path.join(REPO, "tools", "reproduce.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_override_replaces_and_appends():
    rep = _reproduce()
    args = ["--train-iters", "22", "--seed", "0"]
    assert rep._override(args, train_iters=50, gem_alpha=0.5) == ["--train-iters", "50", "--seed", "0", "--gem-alpha", "0.5"]
    assert args == ["--train-iters", "22", "--seed", "0"]  # not modified in place


def test_paper_recipes_unchanged():
    rep = _reproduce()
    assert rep.RECIPES["gem-paper"] == rep.COMMON + ["--gem-alpha", "1.0"]
    assert rep.RECIPES["gem-keep-ntp"] == rep.COMMON + ["--gem-alpha", "0.5"]


def test_every_recipe_parses_and_validates(tmp_path):
    rep = _reproduce()
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"query": "a", "positive": "b"}\n')
    for name, recipe in rep.RECIPES.items():
        recipe = [str(pairs) if a == rep.PAIRS else a for a in recipe]
        args = build_parser().parse_args(["--model", str(model), "--data", str(data), "--save", str(tmp_path / name)] + recipe)
        validate_args(args, dp_size=1)
        assert args.gem_contrastive_from_step < args.train_iters, name  # both phases run
