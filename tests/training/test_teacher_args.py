"""train.py's teacher flags (--contrastive-teacher*, #28): wrong or conflicting ones are one line
on stderr naming the flag, exit 2, before any model (student or teacher) loads; good ones reach
the JobConfig and the GEMConfig; the raw texts the teacher reads line up with the documents and
pairs that train, --split included."""

import json

import pytest

from megatron_gem.training.args import job_config, parse_args
from megatron_gem.training.main import main
from tests.bad_input import forbid, tree


def args_for(tiny_inputs, save, *extra):
    return ["--model", tiny_inputs["model"], "--data", tiny_inputs["data"], "--save", str(save), "--train-iters", "4", "--gem-contrastive-from-step", "2",
            "--seq-length", "64", "--no-progress", *extra]  # fmt: skip


@pytest.fixture
def no_model_load(monkeypatch):
    import megatron_gem.training.main as m
    from megatron_gem.distill import teacher
    from megatron_gem.hf import model

    forbid(monkeypatch, "an engine or the teacher (a model load)", (m, "make_engine"), (model, "load_causal_lm"), (teacher.Teacher, "from_pretrained"))


def _cases(root, tiny_inputs, tiny_teacher):
    no_modules = root / "no_modules"
    no_modules.mkdir()
    (no_modules / "config.json").write_text("{}")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    prefix = root / "tokens_text_document"
    for suffix in (".bin", ".idx"):
        (root / f"tokens_text_document{suffix}").write_bytes(b"x")
    (root / "file.txt").write_text("x")
    t = ("--contrastive-teacher", tiny_teacher)
    return {
        "teacher a typo path": (["--contrastive-teacher", str(root / "nope")], f"--contrastive-teacher {root / 'nope'}: not a directory"),
        "teacher not a sentence-transformers folder": (
            ["--contrastive-teacher", str(no_modules)],
            f"--contrastive-teacher {no_modules}: not a sentence-transformers model folder (no modules.json)",
        ),
        "teacher with pickled weights only": (["--contrastive-teacher", str(pickled)], "pytorch_model.bin: pickled weights are not loaded (safetensors only)"),
        "weight without a teacher": (["--contrastive-teacher-weight", "0.5"], "--contrastive-teacher-weight needs --contrastive-teacher DIR"),
        "temperature without a teacher": (["--contrastive-teacher-temperature", "0.1"], "--contrastive-teacher-temperature needs --contrastive-teacher DIR"),
        "cache without a teacher": (["--contrastive-teacher-cache", str(root / "c")], "--contrastive-teacher-cache needs --contrastive-teacher DIR"),
        "weight 0": ([*t, "--contrastive-teacher-weight", "0"], "--contrastive-teacher-weight 0.0: must lie in (0, 1]"),
        "weight above 1": ([*t, "--contrastive-teacher-weight", "1.5"], "--contrastive-teacher-weight 1.5: must lie in (0, 1]"),
        "temperature 0": ([*t, "--contrastive-teacher-temperature", "0"], "--contrastive-teacher-temperature 0.0: must be a finite number > 0"),
        "no phase 2": ([*t, "--gem-contrastive-from-step", "4"], "--contrastive-teacher is given but phase 2 never runs"),
        "cache a file": ([*t, "--contrastive-teacher-cache", str(root / "file.txt")], "--contrastive-teacher-cache " + str(root / "file.txt") + ": is a file"),
        "documents only as tokens": (
            [*t, "--data", str(prefix)],
            f"--contrastive-teacher with --data {prefix}: a Megatron .bin/.idx prefix holds token ids, not the text the teacher reads",
        ),
    }


CASES = ["teacher a typo path", "teacher not a sentence-transformers folder", "teacher with pickled weights only", "weight without a teacher",
         "temperature without a teacher", "cache without a teacher", "weight 0", "weight above 1", "temperature 0", "no phase 2", "cache a file",
         "documents only as tokens"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_teacher_flags_fail_at_start(tiny_inputs, tiny_teacher, tmp_path, capsys, monkeypatch, no_model_load, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "work"
    root.mkdir()
    cases = _cases(root, tiny_inputs, tiny_teacher)
    extra, message = cases[case]
    before = tree(root)
    assert main(args_for(tiny_inputs, root / "out", *extra)) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], err
    assert "GEMConfig." not in lines[0] and "error" not in out
    assert tree(root) == before


def test_teacher_flags_reach_the_job_config(tiny_inputs, tiny_teacher, tmp_path):
    plain = job_config(parse_args(args_for(tiny_inputs, tmp_path / "a")), world_size=1)
    assert plain.data.teacher is None and plain.data.teacher_cache is None
    assert (plain.gem.teacher_weight, plain.gem.teacher_temperature) == (1.0, 0.05)
    cache = str(tmp_path / "cache")
    extra = ["--contrastive-teacher", tiny_teacher, "--contrastive-teacher-weight", "0.25", "--contrastive-teacher-temperature", "0.1"]
    job = job_config(parse_args(args_for(tiny_inputs, tmp_path / "b", *extra, "--contrastive-teacher-cache", cache)), world_size=1)
    assert job.data.teacher == tiny_teacher and job.data.teacher_cache == cache
    assert (job.gem.teacher_weight, job.gem.teacher_temperature) == (0.25, 0.1)


def test_raw_texts_line_up_with_the_training_documents_and_pairs(tiny_inputs, tiny_teacher, tmp_path):
    """The texts a contrastive batch carries are the input's strings of exactly its documents:
    self-supervised (both sides the document's text) from the data cache (token ids only) under
    --split, and pairs (queries without the query prompt, hard negatives) under --split."""
    from megatron_gem.hf.model import load_tokenizer
    from megatron_gem.training.data_setup import build_loaders, data_cache_dir, open_training_corpus, split_training_corpus

    texts = [json.loads(line)["text"] for line in open(tiny_inputs["data"])]
    tok = load_tokenizer(tiny_inputs["model"])

    def job_of(save, *extra):  # what the trainer has before the data: the GEM token in the tokenizer, its id in the config
        job = job_config(parse_args(args_for(tiny_inputs, save, *extra)), world_size=1)
        tok.add_special_tokens({"additional_special_tokens": job.gem.special_tokens})
        job.gem.special_token_ids = tok.convert_tokens_to_ids(job.gem.special_tokens)
        return job

    t = ["--contrastive-teacher", tiny_teacher, "--split", "80,20,0", "--contrastive-batch-size", "6"]
    job = job_of(tmp_path / "docs", *t, "--contrastive-query-prompt", "query: ")
    corpus = open_training_corpus(job.data, tok, cache_dir=data_cache_dir(job))
    assert type(corpus).__name__ == "IndexedCorpus"  # the cached tokens: the strings were read again
    train, _, _ = split_training_corpus(job, corpus, tok)
    _, cl = build_loaders(job, train, tok, dp_rank=0, dp_size=1)
    ds, batch = cl.dataset, next(iter(cl))
    n = batch["num_texts"]
    assert n == 6 and batch["texts"][:n] == batch["texts"][n:]  # a view's teacher text is its document's
    order = ds._epoch_docs(0)[:n]
    assert batch["texts"][:n] == [texts[int(d)] for d in order]  # train part of --split: documents 0..239
    assert all(tok(texts[int(d)], add_special_tokens=True)["input_ids"] == ds.corpus.get(int(d)).tolist() for d in order)

    pairs = tmp_path / "pairs.jsonl"
    records = [{"query": f"q{i}", "positive": texts[i], **({"negative": [texts[100 + i]]} if i % 2 else {})} for i in range(20)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    extra = [*t, "--contrastive-data", str(pairs), "--contrastive-negative-field", "negative", "--contrastive-query-prompt", "query: "]
    job = job_of(tmp_path / "pairs", *extra)
    _, cl = build_loaders(job, train, tok, dp_rank=0, dp_size=1)
    batch = next(iter(cl))
    got = [int(q[1:]) for q in batch["texts"][: batch["num_texts"]]]  # the raw queries: no prompt
    assert all(i < 16 for i in got)  # --split 80,20,0 of 20 pairs: pairs 0..15 train
    assert batch["texts"][batch["num_texts"] : 2 * batch["num_texts"]] == [texts[i] for i in got]
    assert batch["texts"][2 * batch["num_texts"] :] == [texts[100 + i] for i in got if i % 2]
    assert batch["num_negatives"] == sum(i % 2 for i in got)
