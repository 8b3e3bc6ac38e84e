"""How the proxy shows a human what an agent wrote: escaped, and a call in full.

An approver approves what they read, so what they read must be what happens: every
agent-controlled field is shown with its invisible and line-breaking characters escaped
(the agent must not be able to forge lines or hide text with bidirectional overrides),
and a brokered call is shown with its method, URL, every header with its value, the
header the secret goes into with the value masked, and the body's size and hash.
Telegram (`proxy/telegram_bot.py`) HTML-escapes these lines; the CLI prints them as they are.
"""

from __future__ import annotations

import unicodedata

from .broker import Call
from .policy import Policy

# Characters that could make a reason look like more than one line of text, or like the proxy's own
# lines: controls (newlines, tabs, escapes, C1 controls such as NEL and CSI), line and paragraph
# separators, bidirectional overrides and isolates, zero-width and other invisible format characters,
# and lone surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
MASK = "••••••"


def visible(text: str) -> str:
    """`text` with every invisible or line-breaking character shown as a Python-style escape."""
    out = []
    for ch in text:
        if unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def injected_header(policy: Policy | None) -> tuple[str, str] | None:
    """The header the proxy adds with the secret, its value masked; None for a query parameter."""
    injection = policy.injection if policy else None
    if injection is None or injection.kind == "query":
        return None
    if injection.kind == "basic":
        return "Authorization", f"Basic {MASK} (user {injection.name!r} and the secret)"
    return injection.name, injection.template.replace("{value}", MASK)


def header_lines(call: Call, policy: Policy | None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """`Name: value` for every header the call sends, escaped, values cut at `limit` characters if given:
    (what the approver must always see: where the secret goes and any routing header the policy lets
    through; the other headers). A place that must shorten the list shortens only the second."""
    first: list[str] = []
    injected = injected_header(policy)
    if injected is not None:
        first.append(f"{injected[0]}: {injected[1]} (added by the proxy)")
    elif policy is not None and policy.injection is not None:
        first.append(f"(the secret goes into the query parameter {policy.injection.name!r})")
    routing = set(policy.allow_headers) if policy else set()
    rest: list[str] = []
    for name, value in call.headers:
        shown = visible(value)
        if limit is not None and len(shown) > limit:
            shown = f"{shown[:limit]}… ({len(shown)} characters; see `python -m proxy requests list`)"
        (first if name.lower() in routing else rest).append(f"{visible(name)}: {shown}")
    return first, rest
