"""Take a secret's value out of whatever a destination answers, before the agent sees it.

A service may echo a credential back: an error page quoting the request, a debug endpoint
that base64-encodes the headers it got, a JSON body that escapes `/` as `\\/`. What is
searched for is every rendering of the value that the proxy itself sent (`Renderings`):
the value, the injected header's value and whole line (`Authorization: Bearer VALUE`),
`USER:VALUE` for basic auth, `NAME=VALUE` for a query parameter. Each is found:

* as it is, and in hex, case-insensitively (an upper-cased value is still the value);
* in base64 (standard and URL-safe) at each of the three alignments a rendering can have
  inside a longer encoded text, so base64 of a whole request dump gives it away too;
* inside percent-escapes (`%2F`, `%2f`, double `%252F`), JSON escapes (`\\/`, `\\u002B`, `\\t`,
  surrogate pairs) and HTML character references (`&amp;`, `&#x27;`), in any mix: the answer is
  searched again with those decoded, and once more with line breaks taken out (base64 wrapped
  at 64 or 76 columns, as PEM, `base64` and MIME write it);
* as a server that reads header bytes as Latin-1 echoes a non-ASCII value (UTF-8 of each byte),
  and upper- or lower-cased beyond ASCII;
* in a header name or value with its white space taken out (a value cut by a folded line);
  such a field is replaced whole.

What no redaction can promise: a destination that transforms the value in a way of its own
(encrypts it, reverses it, spells it one character per line) gets it past this module. The
real boundary is the secret's list of destinations (docs/brokered-calls.md).
"""

from __future__ import annotations

import base64
import binascii
import html.entities
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass

MARK = b"[REDACTED]"
# Shorter base64 cores than this would match by chance in ordinary text.
MIN_CORE = 8
_ESCAPE = re.compile(
    rb"%[0-9A-Fa-f]{2}"
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a JSON surrogate pair
    rb"|\\u[0-9a-fA-F]{4}"
    rb"|\\[\\/\"bfnrt]"
    rb"|&#[0-9]{1,7};|&#[xX][0-9a-fA-F]{1,6};|&[A-Za-z]{2,8};"
)
_JSON_SHORT = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_SPACE = re.compile(rb"[\s]+")


@dataclass(frozen=True)
class Spellings:
    """What to search for: text forms (compared case-insensitively, lower-cased here) and base64 forms (exact)."""

    folded: tuple[bytes, ...]
    exact: tuple[bytes, ...]


def _base64_cores(raw: bytes) -> set[bytes]:
    """The base64 characters that depend on `raw` alone, wherever it starts in the encoded text."""
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        # Character i carries bits [6i, 6i+6); the rendering's bits are [8*shift, 8*(shift+len)).
        start = -(-8 * shift // 6)
        end = 8 * (shift + len(raw)) // 6
        core = encoded[start:end]
        if len(core) >= MIN_CORE:
            cores.add(core)
            cores.add(core.replace(b"+", b"-").replace(b"/", b"_"))
    return cores


def forms(value: bytes, renderings: tuple[bytes, ...] = ()) -> Spellings:
    """Every spelling of `value` and of the `renderings` the proxy sent it in (e.g. `Bearer VALUE`)."""
    folded: set[bytes] = set()
    exact: set[bytes] = set()
    for raw in (value, *renderings):
        if not raw:
            continue
        folded.add(raw.lower())
        folded.add(binascii.hexlify(raw))
        if b" " in raw:  # form encoding writes a space as +
            folded.add(raw.replace(b" ", b"+").lower())
        exact.update(_base64_cores(raw))
        # A server that reads header bytes as Latin-1 (RFC 9110's default) echoes each byte as a character.
        if not raw.isascii():
            text = raw.decode("utf-8", "replace")
            for variant in (raw.decode("latin-1").encode(), text.upper().encode(), text.lower().encode()):
                exact.add(variant)
                exact.update(_base64_cores(variant))
    by_length = sorted(folded, key=len, reverse=True), sorted(exact, key=len, reverse=True)
    return Spellings(tuple(by_length[0]), tuple(by_length[1]))


@dataclass(frozen=True)
class _View:
    """`data` with escapes decoded; `starts[i]`/`ends[i]` are the original span of its byte i (arrays of
    machine integers: a list of a million ints would cost the guest's small memory 30 times more)."""

    data: bytes
    starts: array[int]
    ends: array[int]


def _identity(data: bytes) -> _View:
    return _View(data, array("q", range(len(data))), array("q", range(1, len(data) + 1)))


def _decode_escape(token: bytes) -> bytes:
    if token[0:1] == b"%":
        return bytes([int(token[1:3], 16)])
    if token[0:1] == b"&":
        name = token[1:-1].decode("ascii")
        if name.startswith("#"):
            code = int(name[2:], 16) if name[1:2] in ("x", "X") else int(name[1:])
            return chr(code).encode("utf-8", "surrogatepass") if code < 0x110000 else token
        char = html.entities.name2codepoint.get(name)
        return chr(char).encode() if char is not None else token
    if token[1:2] == b"u":
        codes = [int(token[i + 2 : i + 6], 16) for i in range(0, len(token), 6)]
        if len(codes) == 2:
            return chr(0x10000 + ((codes[0] - 0xD800) << 10) + (codes[1] - 0xDC00)).encode()
        return chr(codes[0]).encode("utf-8", "surrogatepass")
    return _JSON_SHORT.get(token[1:2], token[1:2])


def _rewritten(view: _View, pattern: re.Pattern[bytes], replace: Callable[[bytes], bytes]) -> _View | None:
    """`view` with every match of `pattern` replaced, the spans kept; None if nothing matched."""
    data = view.data
    out = bytearray()
    starts: array[int] = array("q")
    ends: array[int] = array("q")
    at = 0
    for match in pattern.finditer(data):
        a, b = match.span()
        out += data[at:a]
        starts += view.starts[at:a]
        ends += view.ends[at:a]
        decoded = replace(match.group())
        out += decoded
        starts += array("q", [view.starts[a]] * len(decoded))
        ends += array("q", [view.ends[b - 1]] * len(decoded))
        at = b
    if at == 0:
        return None
    out += data[at:]
    starts += view.starts[at:]
    ends += view.ends[at:]
    return _View(bytes(out), starts, ends)


def _unescaped(view: _View) -> _View | None:
    """`view` with percent, JSON and HTML escapes decoded once, or None if it has none."""
    if not any(c in view.data for c in (b"%", b"\\", b"&")):
        return None
    return _rewritten(view, _ESCAPE, _decode_escape)


_BREAKS = re.compile(rb"[\r\n]+")


def _unwrapped(view: _View) -> _View | None:
    """`view` without its line breaks: wrapped base64 read as one line."""
    if b"\n" not in view.data and b"\r" not in view.data:
        return None
    return _rewritten(view, _BREAKS, lambda _: b"")


def _find_all(haystack: bytes, needle: bytes) -> list[tuple[int, int]]:
    found = []
    at = haystack.find(needle)
    while at != -1:
        found.append((at, at + len(needle)))
        at = haystack.find(needle, at + 1)
    return found


def _spans(data: bytes, spellings: Spellings) -> list[tuple[int, int]]:
    """Where in `data` any spelling stands, in the answer as it is or with its escapes decoded."""
    spans: list[tuple[int, int]] = []
    views = [_identity(data)]
    for _ in range(2):  # decoded once, decoded twice (%252F)
        decoded = _unescaped(views[-1])
        if decoded is None:
            break
        views.append(decoded)
    unwrapped = _unwrapped(views[-1])
    if unwrapped is not None:
        views.append(unwrapped)
    for view in views:
        lower = view.data.lower()
        for needle in spellings.folded:
            for a, b in _find_all(lower, needle):
                spans.append((view.starts[a], view.ends[b - 1]))
        for needle in spellings.exact:
            for a, b in _find_all(view.data, needle):
                spans.append((view.starts[a], view.ends[b - 1]))
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def redact(data: bytes, spellings: Spellings) -> tuple[bytes, int]:
    """`data` with every spelling replaced by MARK, and how many places were replaced."""
    spans = _merged(_spans(data, spellings))
    if not spans:
        return data, 0
    out = bytearray()
    at = 0
    for a, b in spans:
        out += data[at:a] + MARK
        at = b
    out += data[at:]
    return bytes(out), len(spans)


def redact_field(data: bytes, spellings: Spellings) -> tuple[bytes, int]:
    """A header name or value: replaced whole if it holds a spelling, also one its white space hid."""
    count = len(_merged(_spans(data, spellings)))
    if count or _spans(_SPACE.sub(b"", data), spellings):
        return MARK, max(count, 1)
    return data, 0


WITHHELD = (
    b"[REDACTED: the destination's answer held the secret, so the proxy withholds all of it; "
    b"only its status and headers are given]"
)


def withhold_if_held(body: bytes, spellings: Spellings) -> tuple[bytes, int]:
    """`body` as it is, or WITHHELD whole if any spelling stands in it, and how many places it stood in.

    Not a redaction in place: with the value's places marked, an agent that sent an echoing API a
    thousand guesses would read off the one that was replaced. Whole, it learns one bit per approval."""
    count = len(_merged(_spans(body, spellings)))
    return (WITHHELD, count) if count else (body, 0)


def redact_text(text: str, spellings: Spellings) -> tuple[str, int]:
    """`redact` for text (an error's detail): as its UTF-8 bytes."""
    out, count = redact(text.encode("utf-8", "surrogateescape"), spellings)
    return out.decode("utf-8", "surrogateescape"), count
