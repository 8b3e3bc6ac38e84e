"""What can go wrong on the agent's side, one class per outcome an agent must act on.

Each class carries the command's exit code (the table in docs/agent.md), so a
script can tell a denial from a proxy that is down without reading stderr.
Messages never hold a secret value or the token.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or missing configuration (argparse's own code too)
EXIT_DENIED = 3
EXIT_EXPIRED = 4  # expired undecided, retrieval window closed, or the value was handed out already
EXIT_TIMED_OUT = 5  # still pending when --timeout ran out; the request stays open
EXIT_REFUSED = 6  # the proxy refused the call: 4xx (unknown secret, not allowed, rate limited, bad token, ...)
EXIT_UNREACHABLE = 7  # no answer, or a broken one (5xx, not JSON)
EXIT_CALL_FAILED = 22  # call --fail: the destination answered HTTP >= 400 (curl --fail's code)
EXIT_CANNOT_EXECUTE = 126  # exec: the command exists but cannot be run (the shell's code)
EXIT_NOT_FOUND = 127  # exec: no such command (the shell's code)


class AgentError(Exception):
    """`code` is what `--json` and the MCP tools report: the proxy's own error code when it answered
    one (docs/api.md), else the class's; `request_id` is named in every message once there is one."""

    exit_code = 1
    code = "error"
    hint = ""

    def __init__(self, message: str, *, hint: str = "", request_id: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if hint:
            self.hint = hint
        if code:
            self.code = code

    @property
    def text(self) -> str:
        """The message with the request it concerns, without the hint."""
        rid = self.request_id
        return f"{self.message} (request {rid})" if rid and rid not in self.message else self.message

    def __str__(self) -> str:
        return f"{self.text}; what to do: {self.hint}" if self.hint else self.text

    def as_json(self) -> dict[str, object]:
        return {
            "status": "error",
            "error": self.code,
            "message": self.text,
            "what_to_do": self.hint,
            "id": self.request_id,
            "exit_code": self.exit_code,
        }


class UsageError(AgentError):
    exit_code = EXIT_USAGE
    code = "usage"


class CommandNotFound(UsageError):
    exit_code = EXIT_NOT_FOUND
    code = "command_not_found"


class Denied(AgentError):
    exit_code = EXIT_DENIED
    code = "denied"
    hint = "a human said no: do not ask again for the same purpose unless they tell you to"


class Expired(AgentError):
    exit_code = EXIT_EXPIRED
    code = "expired"
    hint = "ask again with a new request"


class TimedOut(AgentError):
    exit_code = EXIT_TIMED_OUT
    code = "timed_out"


class Refused(AgentError):
    """The proxy answered 4xx; `code` is its stable error code (docs/api.md)."""

    exit_code = EXIT_REFUSED

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retry_after: float | None = None,
        hint: str = "",
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, request_id=request_id, code=code)
        self.retry_after = retry_after


class Unreachable(AgentError):
    exit_code = EXIT_UNREACHABLE
    code = "unreachable"
    hint = "check SECRET_PROXY_URL and that the proxy is running (GET /health)"


class CallFailed(AgentError):
    """`call --fail`: the destination answered HTTP 400 or more."""

    exit_code = EXIT_CALL_FAILED
    code = "http_error"
