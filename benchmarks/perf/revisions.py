"""Earlier versions of a module, imported next to the working tree's, for same-run comparisons."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def source_at(rev: str, path: str) -> str:
    """The text of ``path`` (relative to the repository root) at git revision ``rev``."""
    git = ["git", "-C", str(ROOT), "show", f"{rev}:{path}"]
    return subprocess.run(git, capture_output=True, text=True, check=True).stdout


def import_source(name: str, source: str, folder: str | Path) -> types.ModuleType:
    """``source`` written to ``folder`` and imported as module ``name``, registered in ``sys.modules``
    (dataclasses and pickling look a class's module up by name)."""
    file = Path(folder) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
