"""The research notebook examples/zigzag_tour.ipynb runs top to bottom without errors.

Every cell runs, on the notebook's quick settings (ZIGZAG_TOUR_QUICK=1: shorter prompts, one sample
per task), so the test takes well under a minute on a CPU; a reader's run uses the full sizes."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "zigzag_tour.ipynb"
CELL_TIMEOUT_S = 600


def _kernelspec_for_this_interpreter(folder: Path) -> Path:
    """A ``python3`` kernelspec under ``folder/kernels`` that runs the interpreter running pytest.

    The installed ``python3`` spec usually runs plain ``python`` from PATH, which need not be the
    interpreter that has zigzag installed; putting ``folder`` first on JUPYTER_PATH overrides it
    without touching the user's Jupyter setup.
    """
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (zigzag tests)",
                "language": "python",
            }
        )
    )
    return folder


def test_committed_notebook_has_no_outputs():
    """CI executes the notebook; the committed file stays small and diff-able."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, f"clear the outputs of cells {dirty} before committing (Kernel > Restart & Clear Output)"


@pytest.mark.slow
def test_tour_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    jupyter_dir = _kernelspec_for_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("ZIGZAG_TOUR_QUICK", "1")  # the kernel inherits this process's environment
    # The suite runs Triton kernels in Triton's interpreter on a CPU (conftest); a reader's kernel does
    # not, and the kernels have their own tests, so the notebook runs as a reader runs it.
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        # The harder of the two supported working directories: the notebook must find the repo root.
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, on the first failing cell
    seconds = time.perf_counter() - start
    print(f"\n{NOTEBOOK.name} executed in {seconds:.0f} s")

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    assert all(cell.execution_count for cell in code), "some code cells did not run"
    printed = "".join(out.get("text", "") for cell in code for out in cell.outputs if out.output_type == "stream")
    context = re.search(r"context: (\d+) tokens", printed)
    assert context and int(context.group(1)) < 500, "the notebook did not take its quick settings"
    images = sum("image/png" in out.get("data", {}) for cell in code for out in cell.outputs)
    assert images >= 3, f"expected the budget, survival and accuracy plots; got {images} images"
