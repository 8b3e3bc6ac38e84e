"""Step 3, relocation: private from the first byte, sparse, verified, and only self-contained qcow2."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from takeover import relocate
from takeover.diskimage import inspect_image
from takeover.errors import CopyError, DestinationTaken, DiskFormatError, NotEnoughSpace
from takeover.files import ensure_host_dir
from takeover.relocate import DISK_NAME, PARTIAL_NAME, relocate_disk

from .test_takeover_support import make_qcow2


@pytest.fixture
def host_dir(tmp_path):
    return ensure_host_dir(tmp_path / "host")


def sparse_qcow2(path):
    # metadata preallocation: the file's apparent size is the virtual size, but it is mostly holes
    make_qcow2(path, "256M", "-o", "preallocation=metadata")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", str(path)], check=True,
                   capture_output=True)
    return path


def test_copy_is_0600_root_from_its_first_byte(tmp_path, host_dir, monkeypatch):
    source = sparse_qcow2(tmp_path / "agent.qcow2")
    seen = {}
    real_copy = relocate._copy_sparse

    def spy(src, dst, size, progress):
        st = os.fstat(dst)
        seen.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, size=st.st_size)
        return real_copy(src, dst, size, progress)

    monkeypatch.setattr(relocate, "_copy_sparse", spy)
    old = os.umask(0)  # a careless umask must not widen the mode
    try:
        result = relocate_disk(source, host_dir)
    finally:
        os.umask(old)
    assert seen == {"mode": 0o600, "uid": 0, "size": 0}
    st = os.stat(result.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0
    assert not (host_dir / PARTIAL_NAME).exists()


def test_sparse_source_stays_sparse_and_hash_matches(tmp_path, host_dir):
    source = sparse_qcow2(tmp_path / "agent.qcow2")
    src = os.stat(source)
    assert src.st_blocks * 512 < src.st_size // 4, "the fixture should be mostly holes"
    result = relocate_disk(source, host_dir)
    copy = os.stat(result.path)
    assert copy.st_size == src.st_size
    assert copy.st_blocks <= src.st_blocks + 64  # not filled in
    assert result.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256((host_dir / DISK_NAME).read_bytes()).hexdigest() == result.sha256
    assert inspect_image(host_dir / DISK_NAME).format == "qcow2"


def test_refuses_a_backing_file(tmp_path, host_dir):
    base = make_qcow2(tmp_path / "base.qcow2")
    overlay = make_qcow2(tmp_path / "overlay.qcow2", "64M", "-b", str(base), "-F", "qcow2")
    with pytest.raises(DiskFormatError, match="backing file"):
        relocate_disk(overlay, host_dir)
    assert list(host_dir.iterdir()) == []  # nothing half-copied is left


def test_refuses_an_external_data_file(tmp_path, host_dir):
    disk = make_qcow2(tmp_path / "d.qcow2", "64M", "-o", f"data_file={tmp_path / 'data.raw'}")
    with pytest.raises(DiskFormatError, match="external file"):
        relocate_disk(disk, host_dir)
    assert list(host_dir.iterdir()) == []


def test_refuses_raw_and_other_formats(tmp_path, host_dir):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(DiskFormatError, match="not qcow2"):
        relocate_disk(raw, host_dir)
    assert list(host_dir.iterdir()) == []


def test_refuses_when_the_destination_holds_a_disk(tmp_path, host_dir):
    (host_dir / DISK_NAME).write_bytes(b"taken")
    with pytest.raises(DestinationTaken):
        relocate_disk(make_qcow2(tmp_path / "a.qcow2"), host_dir)
    assert (host_dir / DISK_NAME).read_bytes() == b"taken"


def test_refuses_a_source_replaced_since_step_1(tmp_path, host_dir):
    source = make_qcow2(tmp_path / "a.qcow2")
    with pytest.raises(CopyError, match="replaced"):
        relocate_disk(source, host_dir, expect_inode=(0, 1))


def test_does_not_follow_a_symlinked_source(tmp_path, host_dir):
    target = make_qcow2(tmp_path / "real.qcow2")
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    with pytest.raises(CopyError, match="without following links"):
        relocate_disk(link, host_dir)


def test_a_source_changed_during_the_copy_is_refused(tmp_path, host_dir, monkeypatch):
    source = make_qcow2(tmp_path / "a.qcow2")
    real_hash = relocate._sha256_file

    def agent_writes_meanwhile(path):
        with open(source, "ab") as f:
            f.write(b"planted")
        return real_hash(path)

    monkeypatch.setattr(relocate, "_sha256_file", agent_writes_meanwhile)
    with pytest.raises(CopyError, match="changed while it was being copied"):
        relocate_disk(source, host_dir)
    assert list(host_dir.iterdir()) == []


def test_not_enough_space_is_refused_before_copying(tmp_path, host_dir, monkeypatch):
    source = make_qcow2(tmp_path / "a.qcow2")
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(relocate.os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(NotEnoughSpace):
        relocate_disk(source, host_dir)
    assert list(host_dir.iterdir()) == []
