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
EXIT_CANNOT_EXECUTE = 126  # exec: the command exists but cannot be run (the shell's code)
EXIT_NOT_FOUND = 127  # exec: no such command (the shell's code)


class AgentError(Exception):
    exit_code = 1
    hint = ""

    def __init__(self, message: str, *, hint: str = "", request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; what to do: {self.hint}" if self.hint else self.message


class UsageError(AgentError):
    exit_code = EXIT_USAGE


class CommandNotFound(UsageError):
    exit_code = EXIT_NOT_FOUND


class Denied(AgentError):
    exit_code = EXIT_DENIED
    hint = "a human said no: do not ask again for the same purpose unless they tell you to"


class Expired(AgentError):
    exit_code = EXIT_EXPIRED
    hint = "ask again with a new request"


class TimedOut(AgentError):
    exit_code = EXIT_TIMED_OUT


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
        super().__init__(message, hint=hint, request_id=request_id)
        self.code = code
        self.retry_after = retry_after


class Unreachable(AgentError):
    exit_code = EXIT_UNREACHABLE
    hint = "check SECRET_PROXY_URL and that the proxy is running (GET /health)"
