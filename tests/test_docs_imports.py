"""Every ``from norm_det... import ...`` that README.md and docs/ show a user still works."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_STATEMENT = re.compile(r"^\s*(from norm_det[\w.]* import [\w, ]+|import norm_det[\w.]*)\s*$", re.M)
_INLINE = re.compile(r"`(from norm_det[\w.]* import [\w, ]+)`")


def _statements() -> list[tuple[str, str]]:
    found = set()
    for page in [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for pattern in (_STATEMENT, _INLINE):
            for match in pattern.finditer(text):
                found.add((page.name, match.group(1).strip().rstrip(",")))
    return sorted(found)


def test_the_pages_show_imports():
    assert len(_statements()) >= 10


@pytest.mark.parametrize(("page", "statement"), _statements())
def test_a_documented_import_works(page, statement):
    with warnings.catch_warnings():
        # An old path kept for one release warns; it must still import.
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(statement, {})
