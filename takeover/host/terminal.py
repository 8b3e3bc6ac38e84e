"""What reaches root's terminal: text with no control sequence the agent could have planted in it.

The agent wrote many of the strings the takeover shows (paths, executable names,
ready-file values, QEMU's answers, names found on its disk). A raw ESC or C1 byte
among them would let it move the cursor, rewrite earlier lines, set the window
title or, on some terminals, make the terminal answer back as if root had typed;
a bidi override or a line separator would make a line read as something else.
Every line the CLI and the progress display print passes through `printable`.
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path
from typing import TextIO

# C0/C1 controls and DEL (Cc), invisible format characters such as bidi overrides and zero-width
# joiners (Cf), line and paragraph separators (Zl, Zp), and lone surrogates: os.fsdecode turns a
# non-UTF-8 byte in a path into one, and printing it would raise instead of showing the path.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every control or invisible formatting character shown as a Python-style escape.

    With `newlines`, a plain "\\n" is kept (for multi-line messages such as the summary);
    every other line break is escaped, so one printed line cannot pose as several.
    """
    out = []
    for char in text:
        if (char == "\n" and newlines) or unicodedata.category(char) not in _UNSAFE_CATEGORIES:
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)


def log_tail(path: Path, limit: int = 800) -> str:
    """The end of a log for an error message, escaped: QEMU's logs echo the agent's strings."""
    try:
        text = path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return "(no output)"
    return printable(text, newlines=True) or "(no output)"


def show(text: str, stream: TextIO | None = None) -> None:
    """Print a (multi-line) message to the operator's terminal, escaped; stdout by default."""
    print(printable(text, newlines=True), file=stream or sys.stdout, flush=True)
