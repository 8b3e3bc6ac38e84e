"""`takeover upgrade`'s carry of the proxy's data directory, on two small real disks (libguestfs, TCG).

The old disk's data directory holds what a hostile process in the old VM could leave there: a
symlink to root's files, a FIFO, a hard link, a name the proxy never writes, foreign owners and
modes. Only the proxy's own kind of content crosses, owned and moded as the host says.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from takeover.errors import CarryError
from takeover.guest.carry import CarryLimits, Session, carry_data, check_name, survey

from .takeover_helpers import make_qcow2, open_appliance

DATA = "/var/lib/secret-proxy"
NEW_PROXY_IDS = (13, 13)  # the new image's proxy user (Debian's base-passwd)
STORE = {
    "proxy.db": b"SQLite format 3\0" + b"d" * 5000,
    "proxy.db-wal": b"w" * 3000,
    "master.key": b"k" * 64,
    "config.toml": b'egress_proxy = "http://10.0.2.2:3128"\n',
    "keys/old.key": b"o" * 64,
}


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An old disk whose data directory holds the store and plants; a new one with an empty store."""
    base = tmp_path_factory.mktemp("carry")
    old, new = make_qcow2(base / "old.qcow2", "128M"), make_qcow2(base / "new.qcow2", "128M")
    for disk, fill in ((old, _fill_old), (new, _fill_new)):
        g = open_appliance(disk)
        try:
            g.mkfs("ext4", "/dev/sda")
            g.mount("/dev/sda", "/")
            fill(g)
            g.sync()
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
    return old, new


def _fill_old(g) -> None:
    g.mkdir_p(DATA + "/keys")
    g.mkdir_p("/etc")
    g.write("/etc/shadow", b"root:$6$secret:19000::::::\n")
    for name, data in STORE.items():
        g.write(f"{DATA}/{name}", data)
        g.chmod(0o4777, f"{DATA}/{name}")  # setuid and world-writable: none of it survives
        g.lchown(1000, 1000, f"{DATA}/{name}")
    g.ln_s("/etc/shadow", DATA + "/shadow-link")
    g.mkfifo(0o600, DATA + "/pipe")
    g.ln("/etc/shadow", DATA + "/hard")  # a second name for root's file
    g.write(DATA + "/bad name", b"x")  # a space: not a name the proxy writes


def _fill_new(g) -> None:
    g.mkdir_p(DATA)
    g.mkdir_p("/etc")
    g.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\nproxy:x:13:13:proxy:/home/proxy:/bin/bash\n")
    g.write(DATA + "/stale", b"from the new build")  # the carried directory replaces the new one whole


@pytest.mark.parametrize("name", ["..", ".", "a/b", "line\nbreak", "esc\x1b[31m", "x" * 129, ""])
def test_a_name_the_proxy_never_writes_is_not_carried(name):
    assert check_name(name) is not None


@pytest.mark.parametrize("name", ["proxy.db", "proxy.db-wal", "master.key", "commit.mark", "config.toml"])
def test_the_proxys_own_names_are_carried(name):
    assert check_name(name) is None


@pytest.mark.slow  # a libguestfs appliance, like the scrub's tests: run under the slow tier's lock
def test_too_many_entries_too_many_bytes_or_too_deep_are_refused_before_anything_is_written(disks):
    old, new = disks
    session = Session.open(old, new)
    try:
        with pytest.raises(CarryError, match="more than 5 entries"):
            survey(session.g, CarryLimits(entries=5))
        with pytest.raises(CarryError, match="more than 4096 bytes"):
            survey(session.g, CarryLimits(total_bytes=4096))  # proxy.db alone is over it
        with pytest.raises(CarryError, match="deeper than 0"):
            survey(session.g, CarryLimits(depth=0))
        assert session.g.ls(f"/new{DATA}") == ["stale"]  # the survey wrote nothing
    finally:
        session.discard()


@pytest.mark.slow
def test_only_the_stores_files_cross_owned_and_moded_by_the_host(disks, tmp_path):
    old, new = disks
    result = carry_data(old, new)
    assert result.files == len(STORE) and result.directories == 1
    assert result.bytes == sum(len(v) for v in STORE.values())
    assert result.owner == "13:13"
    skipped = "\n".join(result.skipped)
    for name, why in (
        ("shadow-link", "a symlink"),
        ("pipe", "a FIFO"),
        ("hard", "a hard link"),
        ("bad name", "is not a name the proxy writes"),
    ):
        assert f"{name}: {why}" in skipped, skipped
    g = open_appliance(new, readonly=True)
    try:
        g.mount_ro("/dev/sda", "/")
        assert sorted(g.ls(DATA)) == ["config.toml", "keys", "master.key", "proxy.db", "proxy.db-wal"]
        top = g.lstatns(DATA)
        assert (stat.S_IMODE(top["st_mode"]), top["st_uid"], top["st_gid"]) == (0o700, *NEW_PROXY_IDS)
        keys = g.lstatns(DATA + "/keys")
        assert (stat.S_IMODE(keys["st_mode"]), keys["st_uid"], keys["st_gid"]) == (0o700, *NEW_PROXY_IDS)
        for name, data in STORE.items():
            st = g.lstatns(f"{DATA}/{name}")
            assert stat.S_ISREG(st["st_mode"]) and st["st_nlink"] == 1, name
            assert (stat.S_IMODE(st["st_mode"]), st["st_uid"], st["st_gid"]) == (0o600, *NEW_PROXY_IDS), name
            assert g.read_file(f"{DATA}/{name}") == data, name
    finally:
        g.close()
    # The old disk is unchanged (read-only in the session): its plants are still there, its store too.
    g = open_appliance(old, readonly=True)
    try:
        g.mount_ro("/dev/sda", "/")
        assert g.lstatns(DATA + "/proxy.db")["st_uid"] == 1000
        assert stat.S_ISLNK(g.lstatns(DATA + "/shadow-link")["st_mode"])
    finally:
        g.close()
