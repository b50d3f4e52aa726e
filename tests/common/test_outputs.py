"""Output directories (common/outputs.py): a tool replaces only what its manifest says it wrote,
refuses everything else, and swaps atomically. The old replace_dir_atomic renamed the whole
target away and deleted it (and removed any OUT.tmp / OUT.old it found): these fail on it."""

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_gem.common.errors import InputError, OutputExistsError, OutputWriteError
from megatron_gem.common.manifest import write_manifest
from megatron_gem.common.outputs import building_dir, check_output_dir, fresh_tmp_dir, replace_dir_atomic
from tests.bad_input import tree


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path) -> str:
    # newline="": the text as written ("\r" stays "\r"; read_text would turn it into "\n" and
    # fail the property test whenever hypothesis draws one)
    with open(path, newline="") as f:
        return f.read()


def new_output(out_dir, files: dict) -> str:
    tmp = fresh_tmp_dir(out_dir)
    for rel, text in files.items():
        write(os.path.join(tmp, rel), text)
    write_manifest(tmp)
    return tmp


def test_a_non_empty_target_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    write(out / "notes.txt", "precious")
    before = tree(tmp_path)
    with pytest.raises(OutputExistsError, match="--output .*out: exists and is not empty.*--overwrite-output-dir"):
        check_output_dir(str(out), "--output")
    tmp = new_output(str(out), {"model.safetensors": "new"})
    with pytest.raises(OutputExistsError):
        replace_dir_atomic(tmp, str(out))
    assert tree(tmp_path) == before  # the target as it was, the temporary directory gone


def test_overwrite_replaces_only_what_the_manifest_lists(tmp_path):
    out = tmp_path / "out"
    replace_dir_atomic(new_output(str(out), {"model.safetensors": "old", "stale.json": "old", "sub/a.txt": "old"}), str(out))
    write(out / "notes.txt", "precious")  # the user's, not listed
    write(out / "sub" / "mine.txt", "also precious")
    os.symlink("notes.txt", out / "link")
    replace_dir_atomic(new_output(str(out), {"model.safetensors": "new", "sub/a.txt": "new"}), str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "precious" and (out / "sub" / "mine.txt").read_text() == "also precious"
    assert os.readlink(out / "link") == "notes.txt"
    assert (out / "model.safetensors").read_text() == "new" and (out / "sub" / "a.txt").read_text() == "new"
    assert not (out / "stale.json").exists()  # ours, listed, not in the new output: gone
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or set-aside directory left


def test_a_foreign_file_is_never_overwritten_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    write(out / "config.json", "the user's own")
    before = tree(tmp_path)
    tmp = new_output(str(out), {"config.json": "ours"})
    with pytest.raises(OutputExistsError, match="config.json: not written by megatron-gem"):
        replace_dir_atomic(tmp, str(out), overwrite=True)
    assert tree(tmp_path) == before


def test_neighbours_named_like_old_temporaries_are_left_alone(tmp_path):
    # The old code removed OUT.tmp and OUT.old wherever it found them.
    out = tmp_path / "out"
    write(tmp_path / "out.tmp" / "keep.txt", "a")
    write(tmp_path / "out.old" / "keep.txt", "b")
    before = tree(tmp_path)
    replace_dir_atomic(new_output(str(out), {"x": "1"}), str(out))
    replace_dir_atomic(new_output(str(out), {"x": "2"}), str(out), overwrite=True)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/") and k != "out"} == before


def test_a_file_target_or_a_link_loop_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("precious")
    with pytest.raises(InputError, match="is a file"):
        check_output_dir(str(f), "--output", overwrite=True)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(InputError, match="link loop"):
        check_output_dir(str(loop), "--output", overwrite=True)
    tmp = new_output(str(f), {"x": "1"})
    with pytest.raises(InputError, match="is not a directory"):
        replace_dir_atomic(tmp, str(f), overwrite=True)
    assert f.read_text() == "precious" and not os.path.exists(tmp)


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(InputError, match="not writable"):
        check_output_dir(str(tmp_path / "new" / "out"), "--output")


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(OutputWriteError, match=f"{tmp_path / 'out'}: writing it failed .*No space left"):
        with building_dir(str(tmp_path / "out")) as tmp:
            write(os.path.join(tmp, "part"), "half")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


names = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ours=st.dictionaries(names, st.text(max_size=5), max_size=4),
    foreign=st.dictionaries(names, st.text(max_size=5), max_size=4),
    new=st.dictionaries(names, st.text(max_size=5), min_size=1, max_size=4),
)
@example(ours={}, foreign={"b": "\r"}, new={"a": "x\r\n"})  # carriage returns, drawn by chance once: every run tries them
def test_property_foreign_files_survive_every_replacement(tmp_path_factory, ours, foreign, new):
    """Whatever the earlier output (listed), the user's files (not listed) and the new output:
    the replacement is refused exactly when a foreign file's name is taken by the new output
    (and then nothing changed); otherwise every foreign file is intact, the new files are there,
    and the listed files not in the new output are gone."""
    root = tmp_path_factory.mktemp("prop")
    out = root / "out"
    # A file and a directory cannot share a name ("d" vs "d/e"): keep only consistent trees.
    foreign = {k: v for k, v in foreign.items() if k not in ours and not any(o.startswith(k + "/") or k.startswith(o + "/") for o in ours)}
    if ours:
        replace_dir_atomic(new_output(str(out), ours), str(out))
    for rel, text in foreign.items():
        write(str(out / rel), text)
    before = tree(root)
    clash = any(f == n or f.startswith(n + "/") or n.startswith(f + "/") for f in foreign for n in new)
    try:
        replace_dir_atomic(new_output(str(out), new), str(out), overwrite=True)
    except OutputExistsError:
        assert clash, (ours, foreign, new)  # refused only where a foreign file would be overwritten
        assert tree(root) == before
        return
    assert not clash
    for rel, text in foreign.items():
        assert read(out / rel) == text
    for rel, text in new.items():
        assert read(out / rel) == text
    for rel in set(ours) - set(new) - set(foreign):
        assert not (out / rel).exists()
    assert sorted(os.listdir(root)) == ["out"]
