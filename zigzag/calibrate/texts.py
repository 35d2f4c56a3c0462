"""Calibration text that every machine has: the docstrings of Python's standard library.

Calibration must not read the text a method is later evaluated on. The standard library's module,
class and function docstrings are ordinary technical English that ships with every Python, so a
profile can be measured offline anywhere, and none of the evaluation haystacks uses them. They are read
from the source files with :mod:`ast` (nothing is imported), in sorted file order.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from pathlib import Path

__all__ = ["stdlib_docstrings", "window_starts"]

# Packages whose docstrings are mostly test fixtures or generated tables, not prose.
_SKIP = (
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "turtledemo",
)


@functools.cache
def stdlib_docstrings(min_words: int = 12) -> str:
    """The standard library's docstrings of at least ``min_words`` words, blank-line separated.

    The text depends on the Python version (a profile records which one it read); on CPython 3.11
    it is about 220 thousand words.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if any(p in _SKIP for p in path.relative_to(root).parts[:-1]) or path.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    parts.append(" ".join(doc.split()))
    if not parts:
        raise FileNotFoundError(f"no docstrings found under {root}")
    return "\n\n".join(parts)


def window_starts(length: int, span: int, count: int, seed: int) -> list[int]:
    """Starts of ``count`` windows of ``span`` tokens in a stream of ``length >= span`` tokens, drawn
    with ``seed``: distinct aligned slots when the stream holds ``count`` of them, else any offsets."""
    rng = random.Random(seed)
    slots = length // span
    if slots >= count:
        return [s * span for s in rng.sample(range(slots), count)]
    return [rng.randrange(length - span + 1) for _ in range(count)]
