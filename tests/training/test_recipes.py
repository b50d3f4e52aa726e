"""training/recipes.py: every recipe's train.py arguments parse to its batch and layout, its
DeepSpeed config exists and names its ZeRO stage, and the paper-batch recipes fit by the
estimator in both phases (the 8k throughput recipes' estimates take minutes: tools/estimate_memory.py
--recipes, docs/slurm.md)."""

import json
import os
import shlex

import pytest

from megatron_gem.training import recipes as R
from tests.launch import REPO


@pytest.mark.parametrize("name", sorted(R.RECIPES))
def test_recipe_command_parses_to_its_layout(name):
    from megatron_gem.training.args import build_parser

    r = R.RECIPES[name]
    r.check()
    argv = ["--model", "m", "--data", "d", "--save", "s", "--train-iters", "10", *shlex.split(r.command())]
    args = build_parser().parse_args(argv)
    assert (args.micro_batch_size, args.global_batch_size, args.seq_length) == (r.micro_batch_size, r.global_batch_size, r.seq_length)
    assert bool(args.gradient_checkpointing) == r.gradient_checkpointing
    with open(os.path.join(REPO, args.deepspeed_config)) as f:
        assert json.load(f)["zero_optimization"]["stage"] == r.zero_stage
    assert r.tokens_per_gpu * r.gpus == r.global_batch_size * r.seq_length
    assert (args.gem_train == "summary") == (r.train_mode == "summary")
    assert args.contrastive_micro_batch_size == (r.contrastive_micro_batch_size or None)


@pytest.mark.parametrize("name", [n for n in sorted(R.RECIPES) if n.startswith("paper-")])
def test_paper_recipes_keep_the_papers_batch_and_fit(name):
    """Both phases: phase 2's contrastive micro-batch (16x phase 1's tokens at 512-token rows)
    fits through the recipe's GradCache chunk, the largest that does."""
    r = R.RECIPES[name]
    assert (r.global_batch_size, r.seq_length) == (32, 512)
    assert R.fits(R.estimate(r))
    assert R.fits(R.estimate_phase2(r))
    assert R.choose_contrastive_chunk(r) == r.contrastive_micro_batch_size


@pytest.mark.long
@pytest.mark.parametrize("name", [n for n in sorted(R.RECIPES) if not n.startswith("paper-")])
def test_throughput_recipes_phase2_fits_without_gradcache(name):
    r = R.RECIPES[name]
    assert r.contrastive_micro_batch_size == 0 and R.fits(R.estimate_phase2(r))
