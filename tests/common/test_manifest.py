"""Checkpoint manifests: what a complete checkpoint holds, and refusing damaged ones."""

import json
import os
import threading

import pytest

from megatron_gem.common.files import write_text_atomic
from megatron_gem.common.manifest import MANIFEST, CheckpointError, list_files, verify, write_manifest


@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(5000))
    (tmp_path / "sub" / "b.pt").write_bytes(os.urandom(300))
    (tmp_path / "c.json").write_text("{}\n")
    write_manifest(str(tmp_path), extra={"step": 7})
    return tmp_path


def test_manifest_lists_every_file_with_size_and_sha256(ckpt):
    m = json.loads((ckpt / MANIFEST).read_text())
    assert sorted(m["files"]) == ["a.bin", "c.json", "sub/b.pt"] and m["step"] == 7
    assert m["files"]["a.bin"]["size"] == 5000 and len(m["files"]["a.bin"]["sha256"]) == 64
    assert verify(str(ckpt))["files"] == m["files"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:4000]), "a.bin: 4000 bytes, manifest.json says 5000"),
        (
            lambda d: (d / "sub" / "b.pt").write_bytes(bytes([(d / "sub" / "b.pt").read_bytes()[0] ^ 1]) + (d / "sub" / "b.pt").read_bytes()[1:]),
            "b.pt: content does not match its sha256",
        ),
        (lambda d: (d / "c.json").unlink(), "c.json: missing"),
        (lambda d: (d / MANIFEST).unlink(), "manifest.json: missing: the save did not finish"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable manifest"),
    ],
    ids=["truncated", "flipped-byte", "missing-file", "missing-manifest", "garbled-manifest"],
)
def test_damage_is_refused_naming_the_file(ckpt, damage, message):
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")) as e:
        verify(str(ckpt))
    assert str(ckpt) in str(e.value)


def _as_ranks(world, fn):
    """Run fn(rank, gather) for every rank in threads; gather behaves as all_gather_object."""
    slots, results, barrier = [None] * world, [None] * world, threading.Barrier(world)

    def gather_for(rank):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    def body(rank):
        try:
            results[rank] = fn(rank, gather_for(rank))
        except Exception as e:  # noqa: BLE001 - handed back to the test
            results[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_ranks_share_the_hashing_and_agree(ckpt):
    """Each rank hashes its share; together they give the one-process manifest, and a bad file
    that one rank's share holds is reported by every rank."""
    whole = verify(str(ckpt))
    (ckpt / MANIFEST).unlink()
    made = _as_ranks(3, lambda r, g: write_manifest(str(ckpt), share=(r, 3), gather=g, writer=r == 0))
    assert all(m["files"] == whole["files"] for m in made)
    assert json.loads((ckpt / MANIFEST).read_text())["files"] == whole["files"]
    (ckpt / "sub" / "b.pt").write_bytes(b"x")
    found = _as_ranks(3, lambda r, g: verify(str(ckpt), share=(r, 3), gather=g))
    assert all(isinstance(e, CheckpointError) and "b.pt" in str(e) for e in found), found


def test_temporary_files_of_atomic_writes_are_not_listed(tmp_path):
    write_text_atomic(str(tmp_path / "latest"), "global_step3")
    (tmp_path / "x.tmp.123").write_text("half")
    assert list_files(str(tmp_path)) == ["latest"]


def test_bench_digest_tool_reports_json():
    from tests.launch import run_python

    proc = run_python(["tools/bench_digest.py", "--mib", "1", "--repeats", "1"])
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures) == {f"{d}_gb_per_s" for d in ("sha256", "blake2b", "sha1", "md5", "crc32")}
    assert all(v > 0 for v in figures.values())
