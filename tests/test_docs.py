"""What the docs promise about the tests is true: every `tests/FILE.py::NAME` they cite exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"tests/([A-Za-z0-9_/]+\.py)::([A-Za-z0-9_]+)")


def _cited() -> set[tuple[str, str]]:
    found = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found.update(CITED.findall(doc.read_text()))
    return found


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def test_the_docs_cite_tests():
    assert len(_cited()) > 50  # the threat model names a test for every row


def test_every_test_the_docs_cite_exists():
    missing = []
    for file, name in sorted(_cited()):
        path = ROOT / "tests" / file
        if not path.is_file() or name not in _defined(path):
            missing.append(f"tests/{file}::{name}")
    assert missing == [], "the docs cite tests that do not exist"


PATH_CITED = re.compile(r"\b((?:proxy|takeover|vm_image|tests|bench|scripts)/[A-Za-z0-9_/]+\.(?:py|S|sh))\b")


def test_every_source_file_the_docs_name_exists():
    missing = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in PATH_CITED.findall(doc.read_text()):
            if not (ROOT / path).is_file():
                missing.add(f"{doc.name}: {path}")
    assert sorted(missing) == []
