"""Step 3, relocation: the agent's disk (and any backing file) is read only by the agent's own user, and
arrives in the host directory as a self-contained qcow2 root made, 0600 root:root, or not at all.

Real qemu-img, a real unprivileged user (`spvm-ct-1`), a real sandbox; nothing mocked but the numbers
that make a filesystem look full.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from takeover.agent.diskimage import inspect_image
from takeover.agent.sandbox import SandboxError
from takeover.errors import CopyError, DestinationTaken, DiskFormatError, NotEnoughSpace
from takeover.steps import relocate
from takeover.steps.context import DISK_NAME
from takeover.steps.relocate import relocate_disk

from .takeover_helpers import AGENT, agent_image, as_agent

pytestmark = pytest.mark.root


def leftovers(host_dir: Path) -> list[str]:
    return sorted(p.name for p in host_dir.iterdir())


def test_a_cloud_overlay_is_flattened_into_a_self_contained_root_0600_qcow2(agent_user, agent_dir, host_dir):
    base = agent_image(agent_user, agent_dir / "base.qcow2", fill="write -P 0x41 0 1M")
    top = agent_image(
        agent_user, agent_dir / "disk.qcow2", "64M", "-b", str(base), "-F", "qcow2", fill="write -P 0x42 2M 1M"
    )
    old = os.umask(0)  # a careless umask must not widen any file the host writes
    try:
        result = relocate_disk(top, host_dir)
    finally:
        os.umask(old)
    copy = host_dir / DISK_NAME
    st = os.stat(copy)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
    assert leftovers(host_dir) == [DISK_NAME]  # no raw or partial file stays behind
    info = inspect_image(copy)  # root's own file: a self-contained qcow2, or this raises
    assert info.format == "qcow2" and info.backing == () and info.virtual_size == 64 * 2**20
    assert result.backing_files == [str(base)] and result.agent_uid == agent_user.pw_uid
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(copy)], capture_output=True, text=True
    )
    assert same.returncode == 0, same.stdout + same.stderr  # the chain's content, both layers
    assert st.st_blocks * 512 < 16 * 2**20  # holes stay holes


def test_the_raw_file_is_root_0600_from_its_first_byte(agent_user, agent_dir, host_dir, monkeypatch):
    top = agent_image(agent_user, agent_dir / "disk.qcow2", fill="write -P 0x5a 1M 1M")
    seen = {}
    real = relocate.serve_writes

    def spy(sock, fd, size, **kwargs):
        st = os.fstat(fd)
        seen.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, blocks=st.st_blocks)
        return real(sock, fd, size, **kwargs)

    monkeypatch.setattr(relocate, "serve_writes", spy)
    relocate_disk(top, host_dir)
    assert seen == {"mode": 0o600, "uid": 0, "blocks": 0}


@pytest.mark.parametrize("target", ["/etc/shadow", "root-only"])
def test_a_backing_file_the_agent_cannot_read_is_refused_and_nothing_of_it_reaches_the_host(
    agent_user, agent_dir, host_dir, tmp_path, target
):
    if target == "root-only":
        secret = tmp_path / "root-only.raw"  # under root's 0700 pytest directory, and 0600 itself
        secret.write_bytes(b"ROOT-ONLY-MARKER" * 65536)
        os.chmod(secret, 0o600)
        target = str(secret)
    # The agent writes the header itself; -u: qemu-img (as the agent) cannot open the target either.
    evil = agent_image(agent_user, agent_dir / "disk.qcow2", "1M", "-u", "-b", target, "-F", "raw")
    with pytest.raises(DiskFormatError, match="cannot be read by the agent's own user") as err:
        relocate_disk(evil, host_dir)
    assert target in str(err.value) and "Permission denied" in str(err.value)
    assert leftovers(host_dir) == []


def test_a_backing_file_swapped_for_root_only_after_the_check_still_reads_nothing(
    agent_user, agent_dir, host_dir, tmp_path, monkeypatch
):
    # The check is not the boundary; the sandbox is. The agent passes the check with a harmless
    # base, then points the same name at a root-only file before the conversion opens it.
    secret = tmp_path / "root-only.raw"
    secret.write_bytes(b"ROOT-ONLY-MARKER" * 65536)
    os.chmod(secret, 0o600)
    base = agent_image(agent_user, agent_dir / "base.raw.qcow2", "1M")
    top = agent_image(agent_user, agent_dir / "disk.qcow2", "1M", "-b", str(base), "-F", "qcow2")
    real = relocate.inspect_agent_disk

    def then_swap(*args, **kwargs):
        info = real(*args, **kwargs)
        os.unlink(base)
        os.symlink(secret, base)
        return info

    monkeypatch.setattr(relocate, "inspect_agent_disk", then_swap)
    with pytest.raises(CopyError, match="Permission denied"):
        relocate_disk(top, host_dir)
    assert leftovers(host_dir) == []


def test_a_backing_file_named_by_a_json_spec_is_refused(agent_user, agent_dir, host_dir):
    spec = 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}'
    evil = agent_image(agent_user, agent_dir / "disk.qcow2", "1M", "-u", "-b", spec, "-F", "raw")
    with pytest.raises(DiskFormatError, match="not as an absolute path"):
        relocate_disk(evil, host_dir)
    assert leftovers(host_dir) == []


def test_a_backing_chain_deeper_than_two_is_refused(agent_user, agent_dir, host_dir):
    below = agent_image(agent_user, agent_dir / "0.qcow2", "1M")
    for level in range(1, 4):
        below = agent_image(agent_user, agent_dir / f"{level}.qcow2", "1M", "-b", str(below), "-F", "qcow2")
    with pytest.raises(DiskFormatError, match="more than 2 backing files"):
        relocate_disk(below, host_dir)
    assert leftovers(host_dir) == []
    # two are fine: a cloud image's overlay over a base that is itself an overlay
    ok = agent_dir / "2.qcow2"
    assert relocate_disk(ok, host_dir).backing_files == [str(agent_dir / "1.qcow2"), str(agent_dir / "0.qcow2")]


def test_a_backing_file_in_another_format_is_refused(agent_user, agent_dir, host_dir):
    as_agent(agent_user, "qemu-img", "create", "-q", "-f", "vmdk", str(agent_dir / "base.vmdk"), "1M")
    top = agent_image(agent_user, agent_dir / "disk.qcow2", "1M", "-b", str(agent_dir / "base.vmdk"), "-F", "vmdk")
    with pytest.raises(DiskFormatError, match="'vmdk'"):
        relocate_disk(top, host_dir)
    assert leftovers(host_dir) == []


def test_a_raw_base_under_a_qcow2_overlay_is_taken(agent_user, agent_dir, host_dir):
    raw = agent_dir / "base.raw"
    as_agent(agent_user, "qemu-img", "create", "-q", "-f", "raw", str(raw), "4M")
    as_agent(agent_user, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", str(raw))
    top = agent_image(agent_user, agent_dir / "disk.qcow2", "4M", "-b", str(raw), "-F", "raw")
    result = relocate_disk(top, host_dir)
    assert result.backing_files == [str(raw)]
    assert subprocess.run(["qemu-img", "compare", str(top), str(host_dir / DISK_NAME)]).returncode == 0


def test_an_external_data_file_is_refused(agent_user, agent_dir, host_dir):
    disk = agent_image(agent_user, agent_dir / "d.qcow2", "1M", "-o", f"data_file={agent_dir / 'data.raw'}")
    with pytest.raises(DiskFormatError, match="external file"):
        relocate_disk(disk, host_dir)
    assert leftovers(host_dir) == []


def test_a_raw_top_is_refused(agent_user, agent_dir, host_dir):
    raw = agent_dir / "disk.raw"
    as_agent(agent_user, "qemu-img", "create", "-q", "-f", "raw", str(raw), "1M")
    with pytest.raises(DiskFormatError, match="qcow2"):
        relocate_disk(raw, host_dir)
    assert leftovers(host_dir) == []


def test_a_root_owned_disk_is_not_read_as_root(tmp_path, host_dir):
    disk = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    with pytest.raises(SandboxError, match="owned by root"):
        relocate_disk(disk, host_dir)
    assert leftovers(host_dir) == []


def test_refuses_when_the_destination_holds_a_disk(agent_user, agent_dir, host_dir):
    (host_dir / DISK_NAME).write_bytes(b"taken")
    with pytest.raises(DestinationTaken):
        relocate_disk(agent_image(agent_user, agent_dir / "a.qcow2"), host_dir)
    assert (host_dir / DISK_NAME).read_bytes() == b"taken"


def test_refuses_a_source_replaced_since_step_1(agent_user, agent_dir, host_dir):
    with pytest.raises(CopyError, match="replaced"):
        relocate_disk(agent_image(agent_user, agent_dir / "a.qcow2"), host_dir, expect_inode=(0, 1))


def test_does_not_follow_a_symlinked_source(agent_user, agent_dir, host_dir):
    target = agent_image(agent_user, agent_dir / "real.qcow2")
    link = agent_dir / "link.qcow2"
    link.symlink_to(target)
    with pytest.raises(CopyError, match="without following links"):
        relocate_disk(link, host_dir)


def test_not_enough_space_is_refused_before_writing(agent_user, agent_dir, host_dir, monkeypatch):
    source = agent_image(agent_user, agent_dir / "a.qcow2", fill="write -P 1 0 4M")
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(relocate.os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(NotEnoughSpace):
        relocate_disk(source, host_dir)
    assert leftovers(host_dir) == []


def test_data_past_the_budget_stops_the_flattening_and_is_removed(agent_user, agent_dir, host_dir, monkeypatch):
    # The agent's own report of its allocation is only an estimate; the NBD server counts what lands.
    source = agent_image(agent_user, agent_dir / "a.qcow2", fill="write -P 7 0 8M")
    monkeypatch.setattr(relocate, "_space_budget", lambda host_dir, image: 2 * 2**20)
    with pytest.raises(NotEnoughSpace, match="did not fit in 2 MiB"):
        relocate_disk(source, host_dir)
    assert leftovers(host_dir) == []


def test_a_disk_still_held_by_a_running_qemu_is_not_copied(agent_user, agent_dir, host_dir):
    from .takeover_helpers import start_monitor_only_qemu

    disk = agent_image(agent_user, agent_dir / "a.qcow2")
    vm = start_monitor_only_qemu(agent_dir, disk, user=AGENT)
    try:
        with pytest.raises(CopyError, match="lock"):
            relocate_disk(disk, host_dir)
    finally:
        vm.kill()
    assert leftovers(host_dir) == []
