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


def _stand_in_model(path):
    """A folder the argument checks take for a model (config.json, a tokenizer file); nothing
    here loads it."""
    path.mkdir()
    (path / "config.json").write_text('{"max_position_embeddings": 2048}')
    (path / "tokenizer.json").write_text("{}")
    return path


def _stand_in_teacher(path):
    """A folder the argument checks take for a sentence-transformers model (modules.json)."""
    import json

    path.mkdir()
    (path / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    return path


def _recipe_command(rep, tmp_path):
    """``command(name)``: train.py's arguments of recipe ``name`` on stand-in inputs (a model, a
    teacher, one document, one pair), its placeholders resolved as reproduce.train does."""
    model, teacher = _stand_in_model(tmp_path / "model"), _stand_in_teacher(tmp_path / "teacher")
    data, pairs = tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    data.write_text('{"text": "a"}\n')
    pairs.write_text('{"query": "a", "positive": "b"}\n')

    def command(name):
        recipe = rep.resolve(rep.RECIPES[name], pairs=str(pairs), teacher=str(teacher), teacher_cache=str(tmp_path / "cache"))
        return ["--model", str(model), "--data", str(data), "--save", str(tmp_path / name)] + recipe

    command.paths = {"teacher": str(teacher), "pairs": str(pairs), "cache": str(tmp_path / "cache")}
    return command


def test_every_recipe_parses_and_validates(tmp_path):
    rep = _reproduce()
    command = _recipe_command(rep, tmp_path)
    for name, recipe in rep.RECIPES.items():
        args = build_parser().parse_args(command(name))
        validate_args(args, dp_size=1)
        assert args.gem_contrastive_from_step < args.train_iters, name  # both phases run
        assert rep.is_frozen(recipe) == (args.gem_train == "summary"), name


def test_control_recipes_are_plain_ntp_of_the_same_run(tmp_path):
    rep = _reproduce()
    model = _stand_in_model(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    assert rep.control_name("gem-paper") == "ntp-control-22" and rep.control_name("gem-more-ntp-natural") == "ntp-control-42-natural"
    for name, recipe in rep.RECIPES.items():
        ctl = rep.control_recipe(recipe)
        args = build_parser().parse_args(["--model", str(model), "--data", str(data), "--save", str(tmp_path / "c")] + ctl)
        validate_args(args, dp_size=1)
        assert args.gem_p_raw == 1.0 and args.gem_contrastive_from_step == args.train_iters, name  # no layout, no phase 2
        assert args.gem_train == "full" and not args.contrastive_data, name
        for flag in ("--train-iters", "--lr", "--seq-length", "--micro-batch-size", "--seed"):  # same steps, lr, batch, seed
            assert rep._flag(ctl, flag) == rep._flag(recipe, flag), (name, flag)
    assert set(rep.controls()) == {rep.control_name(n) for n in rep.RECIPES}


def test_control_flags_train_plain_ntp_only(tiny_inputs, tmp_path):
    """A tiny train.py run with a control's flags: every step is phase 1 (no contrastive loss),
    and the run's own GEM config gives pieces that are all plain (no summary token)."""
    from megatron_gem.data import make_ntp_loader, open_corpus
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.model import load_tokenizer
    from tests.launch import launch, read_metrics

    rep = _reproduce()
    tiny = rep._override(
        rep.COMMON, seq_length=64, micro_batch_size=2, train_iters=3, gem_contrastive_from_step=1, contrastive_batch_size=4, contrastive_max_length=16
    )
    save = tmp_path / "run"
    proc = launch(["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(save)] + rep.control_recipe(tiny))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "(phase 2 from 3)" in proc.stdout
    records = read_metrics(save)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["phase"] == 1 and r["cl_loss"] is None and r["ntp_loss"] is not None for r in records)
    cfg = GEMConfig.load(save / "hf")
    assert cfg.p_raw == 1.0 and cfg.contrastive_from_step == 3
    tok = load_tokenizer(str(save / "hf"))
    loader = make_ntp_loader(open_corpus(tiny_inputs["data"], tok), cfg, 64, micro_batch_size=2, seed=0, tokenizer=tok)
    stats = loader.dataset.epoch_stats(0)
    assert set(stats.layouts) == {"plain"} and stats.special_tokens == 0 and stats.pieces > 0


def _row(name, recipe, seed, emb, ppl, kind="gem"):
    tasks = {"A": emb, "B": emb / 2}
    return {"name": name, "kind": kind, "recipe": recipe, "seed": seed, "mteb": tasks, "lm": {"perplexity": {"perplexity": ppl}}}


def test_seed_aggregation_mean_and_spread():
    rep = _reproduce()
    rows = [_row("g", "g", 0, 0.30, 40.0), _row("g seed1", "g", 1, 0.40, 44.0), _row("g seed2", "g", 2, 0.50, 42.0), _row("h", "h", 0, 0.2, 50.0)]
    rows[0]["ppl_vs_control"] = {"control": "c", "ratio": 1.1}
    groups = rep.aggregate_seeds(rows, ["A", "B"])
    g = groups["g"]
    assert g["seeds"] == [0, 1, 2] and g["rows"] == ["g", "g seed1", "g seed2"]
    assert abs(g["mean"]["A"] - 40.0) < 1e-9 and abs(g["spread"]["A"] - 10.0) < 1e-9  # sample sd of 30, 40, 50
    assert abs(g["mean"]["emb avg"] - 30.0) < 1e-9 and abs(g["mean"]["ppl"] - 42.0) < 1e-9 and abs(g["spread"]["ppl"] - 2.0) < 1e-9
    assert g["min"]["ppl"] == 40.0 and g["max"]["ppl"] == 44.0
    assert "ppl/ctl" not in g["mean"]  # only seed 0 has a control ratio: not aggregated
    assert groups["h"]["spread"]["A"] == 0.0
    table = rep.render(rows, ["A", "B"], groups)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, g (3 seeds) as one line, h
    assert lines[2].startswith("| g (3 seeds) | 40.0 ± 10.0 | 20.0 ± 5.0 | **30.0 ± 7.5** |")
    assert "42.0 ± 2.0" in lines[2]
    assert lines[3].startswith("| h | 20.0 | 10.0 | **15.0** |")


def test_seed_group_verdict_on_the_mean_and_per_seed():
    # Base 0.40 -> the bar is 0.52: seeds 0.51, 0.56, 0.515 have mean 0.528 (met on the mean) but
    # only one seed past the bar alone; every GEM row and its base share MC accuracy.
    rep = _reproduce()
    lm = {"gem_trivia_mc": {"acc": 0.5}, "gem_wordnet_def_mc": {"acc": 0.4}}
    base = {"name": "base echo", "kind": "base", "emb_avg": 0.40, "lm": lm}
    rows = [dict(_row(f"g seed{s}" if s else "g", "g", s, 0.0, 30.0), emb_avg=e, lm=dict(lm)) for s, e in enumerate((0.51, 0.56, 0.515))]
    for r, ratio in zip(rows, (1.01, 1.03, 1.02)):
        r["ppl_vs_control"] = {"control": "c", "ratio": ratio}
    ctl = [dict(_row(f"c seed{s}" if s else "c", "c", s, 0.0, 30.0, kind="control"), emb_avg=0.6) for s in range(3)]
    single = dict(_row("h", "h", 0, 0.0, 30.0), emb_avg=0.7, lm=dict(lm))
    groups = {"g": {"seeds": [0, 1, 2]}, "c": {"seeds": [0, 1, 2]}, "h": {"seeds": [0]}}
    (line,) = rep.seed_group_verdicts(rows + ctl + [single], groups, base)  # controls and one-seed rows: none
    assert line.startswith("- g (3 seeds): embedding average 52.8 ± 2.8 vs best base pooling (base echo) 40.0: +32.1% relative on the mean")
    assert "MET on the mean; 1 of 3 seeds meet it alone" in line
    assert "perplexity 1.020 ± 0.010x its control (per seed: 1.010, 1.030, 1.020)" in line
    rows[1]["emb_avg"] = 0.50  # mean 0.508: not met, and no seed alone
    assert "NOT met on the mean; 0 of 3 seeds" in rep.seed_group_verdicts(rows, groups, base)[0]


def test_plan_seeds_headline_rows_and_their_controls():
    rep = _reproduce()
    plan = rep.build_plan([0, 1, 2], "BASE", "MINILM")
    names = [e["name"] for e in plan]
    assert len(names) == len(set(names))
    for h in rep.HEADLINE:
        assert {rep.seeded(h, s) for s in (0, 1, 2)} <= set(names)
        assert {rep.seeded(rep.control_name(h), s) for s in (0, 1, 2)} <= set(names)
    assert "gem-more-ntp seed1" not in names and "gem-more-ntp" in names  # not a headline row: seed 0 only
    seeded = next(e for e in plan if e["name"] == "gem-paper seed2")
    assert rep._flag(seeded["args"], "--seed") == "2" and seeded["recipe"] == "gem-paper"
    assert {e["kind"] for e in plan} == {"base", "control", "gem", "frozen", "ref"}
    assert all(e["data"] == "natural" for e in plan if e.get("recipe", "").endswith("-natural"))


def test_frozen_rows_are_skipped_and_counted_when_training_or_the_frozen_check_fails(tmp_path, monkeypatch, capsys):
    """main() with the frozen rows only: one whose training fails, one whose export is not
    frozen (logits differ); both are skipped with a clear line, counted, and the table is written."""
    import json

    rep = _reproduce()

    def fake_train(name, recipe_args, base, data, runs):
        if name == "gem-summary":
            raise rep.TrainingFailed("train.py exited 2 (log x): error: summary mode is not implemented")
        return str(tmp_path / "export")

    monkeypatch.setattr(rep, "train", fake_train)
    monkeypatch.setattr(rep, "frozen_check", lambda base, export, n: (False, "texts 0..7: logits differ (max |diff| 0.5)"))
    assert rep.main(["--out", str(tmp_path / "out"), "--chart", "", "--only", "gem-summary", "gem-summary-wordnet-pairs"]) == 0
    out = capsys.readouterr().out
    assert "gem-summary: SKIPPED: training failed: train.py exited 2" in out
    assert "gem-summary-wordnet-pairs: SKIPPED: the frozen-base check failed: the export's plain-text logits are not the base" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["name"] for s in results["skipped"]] == ["gem-summary", "gem-summary-wordnet-pairs"] and results["rows"] == []
    assert "skipped 2 row(s)" in (tmp_path / "out" / "table.md").read_text()


def test_teacher_recipes(tmp_path):
    """#28's rows: summary mode with the teacher alone (the distillation text's views) and mixed
    half-half with the WordNet pairs, the run of gem-summary-wordnet-pairs-eol otherwise, plus a
    full-mode control with the teacher; three seeds each in the plan; their NTP controls drop the
    teacher (train.py refuses a teacher without a phase 2)."""
    from megatron_gem.training.args import job_config

    rep = _reproduce()
    command = _recipe_command(rep, tmp_path)
    teacher, pairs = command.paths["teacher"], command.paths["pairs"]

    def job(name):
        return job_config(build_parser().parse_args(command(name)), world_size=1)

    ref = job("gem-summary-wordnet-pairs-eol")
    alone, mixed, full = job("gem-summary-teacher"), job("gem-summary-teacher-pairs"), job("gem-teacher")
    for j in (alone, mixed, full):
        assert j.data.teacher == teacher and j.data.teacher_cache == command.paths["cache"]
        assert (j.optimizer.train_iters, j.gem.contrastive_from_step, j.batch.contrastive_batch_size, j.batch.seq_length) == (280, 30, 64, 256)
        assert j.gem.embed_template == ref.gem.embed_template and j.gem.alpha == 1.0 and j.optimizer.seed == 0
    for j in (alone, mixed):
        assert j.gem.train_mode == "summary" and (j.optimizer.lr, j.optimizer.contrastive_lr) == (ref.optimizer.lr, ref.optimizer.contrastive_lr)
    assert alone.gem.teacher_weight == 1.0 and alone.data.pairs is None and rep.RECIPE_DATA["gem-summary-teacher"] == rep.DISTILL
    assert mixed.gem.teacher_weight == 0.5 and mixed.data.pairs == [pairs] and "gem-summary-teacher-pairs" not in rep.RECIPE_DATA
    assert full.gem.train_mode == "full" and full.gem.teacher_weight == 1.0 and full.data.pairs is None and rep.RECIPE_DATA["gem-teacher"] == rep.DISTILL
    plan = rep.build_plan([0, 1, 2], "BASE", "MINILM")
    names = {e["name"] for e in plan}
    assert {rep.seeded(n, s) for n in ("gem-summary-teacher", "gem-summary-teacher-pairs") for s in (0, 1, 2)} <= names
    assert "gem-teacher" in names and rep.control_name("gem-summary-teacher") == "ntp-control-280-distill"
    assert next(e for e in plan if e["name"] == "gem-summary-teacher seed1")["data"] == rep.DISTILL
    for name in ("gem-summary-teacher", "gem-summary-teacher-pairs", "gem-teacher"):
        assert not any(a.startswith("--contrastive-teacher") or a in (rep.TEACHER, rep.TEACHER_CACHE) for a in rep.control_recipe(rep.RECIPES[name]))


def test_train_env_leaves_the_rendezvous_to_train_py():
    """Two reproduce runs on one host trained with the same fixed MASTER_PORT: the second's
    train.py failed with EADDRINUSE. The child's environment holds no launcher variable, so
    train.py runs as a one-process job on a port the OS gives it (ensure_launcher_env)."""
    from megatron_gem.common.distributed import LAUNCHER_ENV

    rep = _reproduce()
    env = rep.train_env({"RANK": "3", "WORLD_SIZE": "8", "MASTER_PORT": "29633", "MASTER_ADDR": "node7", "LOCAL_RANK": "3", "PATH": "/bin"})
    assert not set(LAUNCHER_ENV) & set(env)
    assert env["PATH"] == "/bin"
