"""The operator's files and screen against an agent on the same machine (issue 11; docs/threat-model.md).

Each attack is played by a real unprivileged user (`nobody`) on real files and
directories: a proxy config or token file reached through a directory or link
the agent controls, a Bot API URL that points back at the host, and control
sequences in strings the agent wrote that would otherwise reach root's terminal.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from takeover.config import read_proxy_config
from takeover.errors import InvalidInput
from takeover.files import create_private_under_trusted_dirs
from takeover.models import Endpoint
from takeover.report import summary
from takeover.terminal import printable
from takeover.verify import SSHTarget, create_agent_token

from .test_takeover_support import write_ready

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
AGENT = "nobody"  # a real unprivileged account plays the agent
TOML = 'telegram_token = "123:host-secret"\ntelegram_chat_id = 42\n'
FAKE_BOT_API = "http://10.0.2.2:8081"  # from the guest: the host's loopback, where any local user can listen


@pytest.fixture
def work():
    """A root-owned 0755 directory the agent can reach (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="spvm-host-files-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(AGENT)
    return entry.pw_uid, entry.pw_gid


def as_agent(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", AGENT, "--", *argv], capture_output=True, text=True, timeout=60)


def agent_dir(path: Path) -> Path:
    """A directory the agent owns (its home, a dir it made in /tmp...)."""
    path.mkdir(mode=0o755)
    os.chown(path, *agent_ids())
    return path


def root_file(path: Path, text: str = TOML, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def takeover_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "takeover", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# -- --proxy-config: the bot token ----------------------------------------------------------------


def test_proxy_config_in_root_only_directories_is_read(work):
    path = root_file(work / "proxy.toml")
    assert read_proxy_config(path) == TOML.encode()


def test_proxy_config_written_by_the_agent_is_refused(work):
    # The agent writes a 0600 file of its own (with its own bot token and approvers) and hopes root
    # is pointed at it: only the mode was checked before.
    home = agent_dir(work / "agent")
    planted = home / "proxy.toml"
    made = as_agent(sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o600); "
                    "os.write(fd, sys.argv[2].encode())", str(planted), TOML)
    assert made.returncode == 0, made.stderr
    with pytest.raises(InvalidInput, match=f"directory {home} is owned by uid {agent_ids()[0]}"):
        read_proxy_config(planted)
    # Even in root's own directory, a file the agent owns is not root's settings.
    os.rename(planted, work / "moved.toml")
    with pytest.raises(InvalidInput, match=f"owned by uid {agent_ids()[0]}, not root"):
        read_proxy_config(work / "moved.toml")


def test_proxy_config_behind_a_symlink_is_refused(work):
    real = root_file(work / "real.toml")
    (work / "link.toml").symlink_to(real)
    with pytest.raises(InvalidInput, match="without following links"):
        read_proxy_config(work / "link.toml")
    # A symlinked directory on the way is refused too: the agent could repoint a link it owns.
    (work / "conf").symlink_to(work)
    with pytest.raises(InvalidInput, match=r"conf is a symlink or not a directory"):
        read_proxy_config(work / "conf" / "real.toml")


def test_proxy_config_in_a_directory_others_can_write_is_refused(work):
    shared = work / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # without the sticky bit: anyone may rename root's file away and put theirs
    path = root_file(shared / "proxy.toml")
    with pytest.raises(InvalidInput, match="someone other than root can change what is in it"):
        read_proxy_config(path)
    os.chmod(shared, 0o1777)  # like /tmp: others cannot replace root's entries
    assert read_proxy_config(path) == TOML.encode()


def test_proxy_config_readable_by_others_or_not_a_file_is_refused(work):
    path = root_file(work / "proxy.toml", mode=0o640)
    with pytest.raises(InvalidInput, match="readable by others"):
        read_proxy_config(path)
    fifo = work / "fifo.toml"
    os.mkfifo(fifo, 0o600)  # opened non-blocking: no writer cannot hang the takeover
    with pytest.raises(InvalidInput, match="not a regular file"):
        read_proxy_config(fifo)


def test_a_bot_api_other_than_telegrams_needs_the_operators_flag(work):
    path = root_file(work / "proxy.toml", TOML + f'telegram_api_url = "{FAKE_BOT_API}"\n')
    with pytest.raises(InvalidInput, match="not to Telegram") as err:
        read_proxy_config(path)
    assert f"--allow-telegram-api-url {FAKE_BOT_API}" in err.value.hint
    with pytest.raises(InvalidInput, match="not to Telegram"):
        read_proxy_config(path, allow_telegram_api_url="http://10.0.2.2:9999")
    assert read_proxy_config(path, allow_telegram_api_url=FAKE_BOT_API + "/") == path.read_bytes()
    telegram = root_file(work / "telegram.toml", TOML + 'telegram_api_url = "https://api.telegram.org/"\n')
    assert read_proxy_config(telegram) == telegram.read_bytes()


def test_cli_refuses_a_fake_bot_api_before_touching_anything(work):
    path = root_file(work / "proxy.toml", TOML + f'telegram_api_url = "{FAKE_BOT_API}"\n')
    result = takeover_cli("run", "--host-dir", str(work / "host"), "--ready-file", str(work / "ready"),
                          "--proxy-config", str(path))
    assert result.returncode == 1
    assert "not to Telegram" in result.stderr and "--allow-telegram-api-url" in result.stderr
    assert "123:host-secret" not in result.stderr + result.stdout
    assert not (work / "host").exists()
    # With the flag the config passes and the run goes on to look for the agent's VM.
    result = takeover_cli("run", "--host-dir", str(work / "host"), "--ready-file", str(work / "ready"),
                          "--proxy-config", str(path), "--allow-telegram-api-url", FAKE_BOT_API)
    assert result.returncode == 1 and "no ready file" in result.stderr


# -- --token-file ---------------------------------------------------------------------------------


def test_token_file_through_the_agents_symlinked_directory_is_refused(work):
    # The operator means a root directory; the agent made that name a link to a directory it owns
    # (here in sticky /tmp-like space it may write), so the token would land where it chooses.
    drop = work / "drop"
    drop.mkdir()
    os.chmod(drop, 0o1777)
    loot = agent_dir(work / "loot")
    planted = as_agent("ln", "-s", str(loot), str(drop / "tokens"))
    assert planted.returncode == 0, planted.stderr
    token_file = drop / "tokens" / "alice.token"
    with pytest.raises(InvalidInput, match="tokens is a symlink or not a directory"):
        create_private_under_trusted_dirs(token_file, "--token-file")
    result = takeover_cli("run", "--host-dir", str(work / "host"), "--ready-file", str(work / "ready"),
                          "--agent-name", "alice", "--token-file", str(token_file))
    assert result.returncode == 1 and "symlink" in result.stderr and "what to do:" in result.stderr
    assert not (work / "host").exists()  # refused before anything changed
    assert list(loot.iterdir()) == []


def test_token_file_in_the_agents_directory_is_refused_before_the_agent_is_made(work):
    loot = agent_dir(work / "loot")
    ssh = SSHTarget(Endpoint("127.0.0.1", 9), work / "no-key", work / "no-known-hosts")
    # Refused before any SSH: no agent is created in the VM for a token that cannot be kept.
    with pytest.raises(InvalidInput, match=f"directory {loot} is owned by uid {agent_ids()[0]}"):
        create_agent_token(ssh, "alice", "api-*", loot / "alice.token")
    assert list(loot.iterdir()) == []


def test_token_file_is_new_and_0600_from_its_first_byte(work):
    old = os.umask(0)
    try:
        fd = create_private_under_trusted_dirs(work / "alice.token", "--token-file")
        os.close(fd)
    finally:
        os.umask(old)
    st = os.stat(work / "alice.token")
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
    (work / "planted.token").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="already exists"):
        create_private_under_trusted_dirs(work / "planted.token", "--token-file")
    with pytest.raises(InvalidInput, match="already exists"):
        create_private_under_trusted_dirs(work / "alice.token", "--token-file")


# -- root's terminal ------------------------------------------------------------------------------

ESCAPES = "\x1b]0;root is pwned\x07\x1b[2J\x1b[1A\x9b31m\u202egnp.exe\u2028"


def test_printable_escapes_controls_bidi_and_broken_utf8():
    shown = printable("a" + ESCAPES + "\x7f\udcff\tb\nc")
    assert shown == ("a\\x1b]0;root is pwned\\x07\\x1b[2J\\x1b[1A\\x9b31m\\u202egnp.exe\\u2028"
                     "\\x7f\\udcff\\x09b\\x0ac")
    assert printable("one\ntwo", newlines=True) == "one\ntwo"
    assert printable("plain ünïcode, 日本") == "plain ünïcode, 日本"


def test_agent_control_sequences_never_reach_roots_terminal(work):
    # The agent writes its ready file; the monitor path carries terminal escapes (a window title, clear
    # screen, cursor up, a C1 CSI, a bidi override, a line separator). The run fails at step 1 and both
    # the progress display and the error quote that path.
    home = agent_dir(work / "agent")
    ready = home / "ready"
    data = {"version": 1, "monitor": f"/tmp/qmp{ESCAPES}.sock", "disk": f"/tmp/disk{ESCAPES}.qcow2"}
    written = as_agent(sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(ready),
                       "READY_FOR_TAKEOVER\n" + json.dumps(data) + "\n")
    assert written.returncode == 0, written.stderr
    result = takeover_cli("run", "--host-dir", str(work / "host"), "--ready-file", str(ready))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "[1/8] find and check the agent's VM" in result.stderr and "FAILED" in result.stderr
    assert "\\x1b]0;root is pwned\\x07" in result.stderr  # shown, escaped
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\u2028"):
        assert raw not in out, repr(raw)


def test_summary_keeps_each_agent_string_on_its_own_escaped_line(work):
    report = {
        "steps": [{"title": "t", "status": "done", "duration_s": 1.0}] * 2,
        "scrub": {"changes": [{"action": "removed", "path": "/x"}],
                  "findings": ["/home/agent/.bashrc\nTakeover complete.\x1b[2J"], "not_blocked": []},
        "keys": {}, "vm": {"spec": {}}, "files": {"disk": "/d", "report": "/r"}, "agent_token": None,
    }
    text = summary(report)
    assert "\x1b" not in text
    assert "  seen: /home/agent/.bashrc\\x0aTakeover complete.\\x1b[2J" in text.splitlines()
