"""lorite.cache: atomic writes leave no temporary behind and give the file a plain file's mode."""

import os
import stat

import pytest

from lorite.cache import atomic_directory, atomic_write_text, restore_interrupted_replace


def test_atomic_write_text_replaces_whole_and_has_the_umask_mode(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["notes.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not tempfile's 0600


def test_atomic_directory_keeps_the_old_one_when_the_writer_fails(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_restore_interrupted_replace_puts_back_only_a_directory_whose_replacement_was_cut(tmp_path):
    target = tmp_path / "checkpoint"
    assert restore_interrupted_replace(target) is None  # nothing there at all
    old = tmp_path / ".checkpoint.old-17"
    old.mkdir()
    (old / "state").write_text("step 4")
    target.mkdir()
    (target / "state").write_text("step 6")
    assert restore_interrupted_replace(target) is None, "a target that exists is left as it is"
    assert (target / "state").read_text() == "step 6" and old.exists()
    for path in (target / "state", target):
        path.unlink() if path.is_file() else path.rmdir()
    assert restore_interrupted_replace(target) == old
    assert (target / "state").read_text() == "step 4" and not old.exists()
