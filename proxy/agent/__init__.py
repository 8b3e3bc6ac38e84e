"""The agent's side of the proxy: `secret-proxy-agent` (a command) and an MCP server.

They run outside the VM, as the agent's user, and hold only the agent's token.
The command needs nothing but the standard library, so Debian's python3 runs it
with nothing installed; the MCP server needs the `mcp` SDK (the `agent` extra),
which never goes into the guest.
"""
