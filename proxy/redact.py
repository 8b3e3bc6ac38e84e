"""Take a secret's value out of whatever a destination answers, before the agent sees it.

A service may echo a credential back (an error page quoting the header, a debug
endpoint). The value is removed raw and in the encodings a response is likely to
carry it in: standard and URL-safe base64 (with or without padding, and of
`user:value` for basic auth), and URL encoding (`%XX` and `+` for spaces).
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote, quote_plus

MARK = b"[REDACTED]"
_LOWER_HEX = re.compile(r"%[0-9A-F]{2}")


def forms(value: bytes, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    """Every spelling of `value` (and of `extra`, e.g. `user:value`) to remove, longest first."""
    found: set[bytes] = set()
    for raw in (value, *extra):
        if not raw:
            continue
        found.add(raw)
        for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
            found.add(encoded)
            found.add(encoded.rstrip(b"="))
        text = raw.decode("utf-8", "surrogateescape")
        for url in (
            quote(text, safe="", errors="surrogateescape"),
            quote_plus(text, safe="", errors="surrogateescape"),
        ):
            found.add(url.encode())
            found.add(_LOWER_HEX.sub(lambda m: m.group(0).lower(), url).encode())
    return sorted(found, key=len, reverse=True)


def redact(data: bytes, spellings: list[bytes]) -> tuple[bytes, int]:
    """`data` with every spelling replaced by MARK, and how many replacements were made."""
    count = 0
    for spelling in spellings:
        n = data.count(spelling)
        if n:
            count += n
            data = data.replace(spelling, MARK)
    return data, count


def redact_text(text: str, spellings: list[bytes]) -> tuple[str, int]:
    out, n = redact(text.encode("utf-8", "surrogateescape"), spellings)
    return out.decode("utf-8", "surrogateescape"), n
