"""data/indexed.py reads and writes the bytes megatron-core's IndexedDataset does: files written
by megatron-core's builder read back through ours, ours through megatron-core's reader; and the
DeepSpeed path's data modules import no megatron-core."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from megatron_gem.data import IndexedCorpus, IndexedWriter
from megatron_gem.data.indexed import IndexedFile, optimal_dtype


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _documents(seed, n=40, vocab=300):
    rng = np.random.default_rng(seed)
    # empty documents and long ones: pointer arithmetic over both
    return [rng.integers(0, vocab, size=int(rng.integers(0, 50))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [300, 70000])
def test_ours_read_by_megatron_core(tmp_path, vocab):
    docs = _documents(1, vocab=vocab)
    with IndexedWriter(tmp_path / "ours", vocab) as w:
        for d in docs:
            w.add(d)
    assert w.dtype == _megatron().DType.optimal_dtype(vocab) == optimal_dtype(vocab)
    theirs = _megatron().IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs) and list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d)


def test_megatron_cores_read_by_ours_multi_sequence_documents(tmp_path):
    idx = _megatron()
    seqs = _documents(2, n=30)
    builder = idx.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    groups = [seqs[0:3], seqs[3:4], seqs[4:4], seqs[4:10], seqs[10:30]]  # several sequences per document, one empty document
    for g in groups:
        if g:
            builder.add_document(np.concatenate(g), [len(s) for s in g])
        else:
            builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedFile(tmp_path / "mc")
    theirs = idx.IndexedDataset(str(tmp_path / "mc"))
    assert ours.dtype == np.uint16
    assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(theirs)):
        assert np.array_equal(ours.sequence(i), theirs[i])
    corpus = IndexedCorpus(tmp_path / "mc")
    assert [int(n) for n in corpus.lengths] == [sum(len(s) for s in g) for g in groups]
    for j, g in enumerate(groups):
        expect = np.concatenate(g) if g else np.zeros(0)
        assert np.array_equal(corpus.get(j), expect)
        assert np.array_equal(corpus.get_slice(j, 2, 5), expect[2:7])
    first = corpus.first_tokens()
    assert [int(f) for f in first] == [int(np.concatenate(g)[0]) if g and len(np.concatenate(g)) else -1 for g in groups]


def test_damaged_index_is_named(tmp_path):
    with IndexedWriter(tmp_path / "c", 300) as w:
        for d in _documents(3):
            w.add(d)
    raw = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "c.idx").write_bytes(raw[: len(raw) // 2])
    from megatron_gem.data import DataError

    with pytest.raises(DataError, match="c.idx: truncated"):
        IndexedCorpus(tmp_path / "c")
    (tmp_path / "c.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="bad header"):
        IndexedCorpus(tmp_path / "c")


def test_the_deepspeed_data_path_imports_no_megatron_core(tmp_path):
    with IndexedWriter(tmp_path / "c", 300) as w:
        for d in _documents(4):
            w.add(d)
    code = (
        "import sys\n"
        "from megatron_gem.data import IndexedCorpus, IndexedWriter, open_corpus\n"
        "from megatron_gem.data.blend import blending_indices\n"
        f"c = IndexedCorpus({str(tmp_path / 'c')!r}); c.get(0); c.first_tokens()\n"
        "assert not any(m == 'megatron.core' or m.startswith('megatron.core.') for m in sys.modules), sorted(m for m in sys.modules if m.startswith('megatron.'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path.parent))
