"""tools/demo.py at unit level (the full demo trains SmolLM2 for minutes: not run here): the
base rows (mean, echo, PromptEOL), the perplexity ratio, and summary mode's bit-identity check."""

import copy

import torch

from megatron_gem.eval import builders
from megatron_gem.eval.perplexity import heldout_perplexity, plain_logits_identical
from tests.launch import load_tool

TEXTS = ["the cat sleeps under the tree.", "a red bird sings in the morning", "water"]


def _tasks():
    pairs = builders.PairSet("Pairs", ["cat", "dog", "tree"], ["dog", "bird", "water"], [8.0, 5.0, 1.0], 0.0, 10.0)
    retrieval = builders.RetrievalSet("Ret", ["a cat", "a tree"], ["the cat sleeps", "the old tree", "water"], [{0}, {1}])
    return [pairs, retrieval]


def test_base_rows_are_the_three_poolings_with_one_shared_perplexity(tiny_tokenizer, tiny_llama):
    demo = load_tool("demo")
    rows = demo.base_rows(tiny_llama, tiny_tokenizer, _tasks(), TEXTS, max_length=48, batch_size=2)
    assert [r["model"] for r in rows] == [name for _, name in demo.BASE_POOLINGS]
    assert [m for m, _ in demo.BASE_POOLINGS] == ["mean", "echo", "prompteol"]
    ppl = heldout_perplexity(tiny_llama, tiny_tokenizer, TEXTS, max_length=256, batch_size=8)
    assert all(r["perplexity"] == ppl for r in rows)
    for r in rows:
        assert set(r) == {"model", "Pairs", "Ret", "embedding_avg", "perplexity"}
        assert r["embedding_avg"] == (r["Pairs"] + r["Ret"]) / 2
    assert rows[0]["Ret"] != rows[1]["Ret"] or rows[0]["Pairs"] != rows[1]["Pairs"]  # different poolings, different scores


def test_perplexity_ratio_and_table(capsys):
    demo = load_tool("demo")
    rows = [{"model": "base", "Pairs": 0.5, "embedding_avg": 0.5, "perplexity": 40.0}, {"model": "gem", "Pairs": 0.7, "embedding_avg": 0.7, "perplexity": 50.0}]
    demo.add_perplexity_ratio(rows, rows[0]["perplexity"])
    assert rows[0]["perplexity_ratio"] == 1.0 and rows[1]["perplexity_ratio"] == 1.25
    text = demo.print_table(rows, ["Pairs"])
    assert "perplexity_ratio" in text.splitlines()[0]
    assert "1.250" in text.splitlines()[3]


def test_frozen_check_passes_only_on_bit_identical_logits(tiny_tokenizer, tiny_llama):
    demo = load_tool("demo")
    same = copy.deepcopy(tiny_llama)
    ok, line = demo.frozen_check(tiny_llama, same, tiny_tokenizer, TEXTS)
    assert ok and line.startswith("perplexity unchanged: logits bit-identical")
    nudged = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        w = nudged.model.layers[0].mlp.down_proj.weight
        w[0, 0] += 1e-3  # one weight of one layer
    ok, line = demo.frozen_check(tiny_llama, nudged, tiny_tokenizer, TEXTS)
    assert not ok and "bit-identical" not in line and "FAILED" in line


def test_plain_logits_identical_ignores_padding_and_rejects_other_vocabularies(tiny_tokenizer, tiny_llama):
    ok, detail = plain_logits_identical(tiny_llama, copy.deepcopy(tiny_llama), tiny_tokenizer, TEXTS, batch_size=2)
    assert ok and "3 texts" in detail
    bigger = copy.deepcopy(tiny_llama)
    bigger.resize_token_embeddings(len(tiny_tokenizer) + 8)
    ok, detail = plain_logits_identical(tiny_llama, bigger, tiny_tokenizer, TEXTS)
    assert not ok and "logits" in detail


def test_cached_base_rows_are_used_only_under_the_same_key(tmp_path):
    import json

    demo = load_tool("demo")
    path = tmp_path / "base_rows.json"
    assert demo.cached_base_rows(str(path), {"a": 1}) is None  # nothing cached yet
    path.write_text(json.dumps({"key": {"base_digest": "d", "eval_items": 200}, "rows": [{"model": "m"}]}))
    assert demo.cached_base_rows(str(path), {"base_digest": "d", "eval_items": 200}) == [{"model": "m"}]
    assert demo.cached_base_rows(str(path), {"base_digest": "other", "eval_items": 200}) is None
    assert demo.cached_base_rows(str(path), {"base_digest": "d", "eval_items": 100}) is None


def test_reference_row_is_the_packaged_embedder_without_perplexity():
    """The reference row is all-MiniLM-L6-v2's own scores on the demo's tasks: scored here
    through sentence-transformers directly, the row must equal them."""
    from sentence_transformers import SentenceTransformer

    from megatron_gem.eval.quick import score_embeddings
    from megatron_gem.packaged_models import minilm_dir

    demo = load_tool("demo")
    row = demo.reference_row(_tasks())
    st = SentenceTransformer(minilm_dir(), device="cpu")
    expected = score_embeddings(lambda t: st.encode(list(t)), _tasks())
    assert row["model"].startswith(demo.TEACHER_NAME) and row["perplexity"] is None
    assert {k: row[k] for k in expected} == expected


def test_teacher_flag_names_the_packaged_teacher_or_a_folder(tmp_path, capsys):
    import pytest

    demo = load_tool("demo")
    assert demo.parse_args([]).contrastive_teacher_weight == 0.5
    assert demo.parse_args([]).contrastive_teacher == demo.TEACHER_NAME  # summary mode's default: the measured best recipe
    assert demo.parse_args(["--gem-train", "full"]).contrastive_teacher == ""  # not measured in full mode
    assert demo.parse_args(["--contrastive-teacher", ""]).contrastive_teacher == ""
    assert demo.parse_args(["--contrastive-teacher", demo.TEACHER_NAME]).contrastive_teacher == demo.TEACHER_NAME
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    assert demo.parse_args(["--contrastive-teacher", str(tmp_path / "st")]).contrastive_teacher == str(tmp_path / "st")
    with pytest.raises(SystemExit):
        demo.parse_args(["--contrastive-teacher", str(tmp_path)])  # no modules.json
    assert "not a sentence-transformers folder" in capsys.readouterr().err
