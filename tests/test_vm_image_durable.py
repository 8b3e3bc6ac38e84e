"""vm_image/durable.py: the one atomic write (vm_image's files and the takeover's), and the proxy's pinned copy."""

from __future__ import annotations

import inspect
import os
import stat
from pathlib import Path

import pytest

from proxy import key_files
from takeover.host import files
from vm_image import durable


def test_a_new_file_has_its_mode_from_the_first_byte_whatever_the_umask(tmp_path: Path):
    old = os.umask(0o077)
    try:
        durable.write_atomic(tmp_path / "manifest.json", b"{}\n", mode=0o644)
    finally:
        os.umask(old)
    old = os.umask(0)
    try:
        durable.write_atomic(tmp_path / "key", b"secret\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert (tmp_path / "key").read_bytes() == b"secret\n"


def test_a_link_at_the_path_is_replaced_never_written_through(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "ready").symlink_to(victim)
    durable.write_atomic(tmp_path / "ready", b"new")
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "ready").is_symlink() and (tmp_path / "ready").read_bytes() == b"new"


def test_a_write_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path: Path, monkeypatch):
    target = tmp_path / "state.json"
    durable.write_atomic(target, b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        durable.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_write_in_a_directory_given_by_descriptor_does_not_look_the_directory_up_again(tmp_path: Path):
    checked = tmp_path / "checked"
    checked.mkdir()
    dir_fd = os.open(checked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # The directory the caller checked is moved and another put in its place: the write follows the descriptor.
        checked.rename(tmp_path / "moved")
        (tmp_path / "checked").mkdir()
        durable.write_atomic("cache.json", b"{}", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "moved" / "cache.json").read_bytes() == b"{}"
    assert not (tmp_path / "checked" / "cache.json").exists()


def test_the_takeover_writes_with_the_same_functions():
    assert files.write_atomic is durable.write_atomic
    assert files.fsync_dir is durable.fsync_dir


def test_the_proxys_own_fsync_dir_stays_equal_to_vm_images():
    # The proxy may import nothing of ours (docs/architecture.md's layers), so it keeps a copy.
    assert inspect.getsource(key_files.fsync_dir) == inspect.getsource(durable.fsync_dir)
