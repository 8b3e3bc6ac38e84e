"""`python3 -m proxy.agent.wheel [DIR]` (`make agent-wheel`): the agent's tools alone, as a wheel.

The project's own wheel carries the proxy and its dependencies (Starlette, cryptography, ...),
which the agent's machine has no use for. This one holds `proxy/__init__.py` and `proxy/agent/`
only, needs nothing to install (`pip install --no-index FILE.whl`), and names the MCP SDK as
its `mcp` extra. Built with the standard library, so a fresh machine needs no build tools:

    pip install build/secret_proxy_agent-VERSION-py3-none-any.whl           # the command
    pip install 'build/secret_proxy_agent-VERSION-py3-none-any.whl[mcp]'    # and the MCP server

It installs a package named `proxy`, like the project's own wheel: install one of the two
into an environment, not both.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tomllib
import zipfile
from pathlib import Path

NAME = "secret-proxy-agent"
CHECKOUT = Path(__file__).resolve().parent.parent.parent
MCP_REQUIREMENT = "mcp>=2.3,<3"  # the `agent` extra of pyproject.toml; tests/test_agent_install.py pins them equal


def version() -> str:
    with open(CHECKOUT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def files() -> list[Path]:
    """The wheel's modules, relative to the checkout: `proxy/__init__.py` and `proxy/agent/*.py`."""
    return [
        Path("proxy/__init__.py"),
        *sorted(p.relative_to(CHECKOUT) for p in (CHECKOUT / "proxy/agent").glob("*.py")),
    ]


def metadata(ver: str) -> dict[str, str]:
    dist_info = f"{NAME.replace('-', '_')}-{ver}.dist-info"
    return {
        f"{dist_info}/METADATA": "\n".join(
            [
                "Metadata-Version: 2.1",
                f"Name: {NAME}",
                f"Version: {ver}",
                "Summary: The agent's tools for secret-proxy-vm: secrets a human approves (command, MCP server)",
                "License: MIT",
                "Requires-Python: >=3.11",
                "Provides-Extra: mcp",
                f'Requires-Dist: {MCP_REQUIREMENT}; extra == "mcp"',
                "",
            ]
        ),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: proxy.agent.wheel\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": "[console_scripts]\nsecret-proxy-agent = proxy.agent.commands:main\n",
    }


def build(out_dir: Path) -> Path:
    """Write the wheel into `out_dir`; its path."""
    ver = version()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME.replace('-', '_')}-{ver}-py3-none-any.whl"
    entries = {str(rel): (CHECKOUT / rel).read_bytes() for rel in files()}
    entries.update({name: text.encode() for name, text in metadata(ver).items()})
    record_name = f"{NAME.replace('-', '_')}-{ver}.dist-info/RECORD"
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in entries.items()]
    entries[record_name] = ("\n".join([*record, f"{record_name},,"]) + "\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # the same bytes from the same files
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return path


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else CHECKOUT / "build")))
