"""The documented install of the agent's tools, on a machine that has nothing of the project: `make
agent-wheel`, then `pip install --no-index` of that wheel into a fresh `python3 -m venv`. No network: the
command needs nothing but the standard library. Then the installed command asks a real `proxy serve`."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from proxy.agent import wheel
from tests.agent_helpers import agent_env, decide_when_asked, token_file
from tests.proxy_helpers import ROOT, SECRET_VALUE, LiveServer, Proxy


def test_the_agent_wheel_installs_alone_into_a_fresh_venv_and_asks_the_proxy(
    tmp_path: Path, live: LiveServer, proxy_data: Proxy
) -> None:
    built = subprocess.run(
        ["make", "-s", "agent-wheel", f"AGENT_WHEEL_DIR={tmp_path / 'dist'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    (whl,) = (tmp_path / "dist").glob("secret_proxy_agent-*-py3-none-any.whl")

    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True)
    installed = subprocess.run(
        [str(venv / "bin/pip"), "install", "--no-index", "--disable-pip-version-check", str(whl)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1"},
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    env = agent_env(live.url, token_file(tmp_path, proxy_data.token))
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    approver = decide_when_asked(live.settings.data_dir)
    got = subprocess.run(
        ["secret-proxy-agent", "get", "api-key", "--reason", "from the installed wheel", "--timeout", "30"],
        cwd=tmp_path,  # not the checkout: the installed package answers
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    approver.join(5)
    assert got.returncode == 0, got.stderr
    assert got.stdout == SECRET_VALUE

    alone = subprocess.run([str(venv / "bin/python"), "-c", "import starlette"], capture_output=True, cwd=tmp_path)
    assert alone.returncode != 0  # the proxy's dependencies stayed behind
    mcp = subprocess.run(["secret-proxy-agent", "mcp"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert mcp.returncode == 2 and "pip install" in mcp.stderr and "mcp" in mcp.stderr  # says how to add the SDK


def test_the_wheels_mcp_extra_is_the_projects_agent_extra() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["optional-dependencies"]["agent"] == [wheel.MCP_REQUIREMENT]
    assert wheel.version() == project["version"]
