"""The notebooks in notebooks/ run top to bottom, and the committed copies carry their outputs.

The integration test executes a temporary copy of each notebook with nbclient on an ipykernel kernel (the committed
file is never rewritten) and fails on the first cell that raises. The fast test checks the committed files: every
code cell was executed, in order, without an error output, and the figures are in them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"token_attribution.ipynb", "similarity_attribution.ipynb", "dataset_attribution.ipynb",
            "fairness_audit.ipynb"}
CELL_TIMEOUT_SECONDS = 900


def test_the_expected_notebooks_exist() -> None:
    assert EXPECTED <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_its_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code[0].source.startswith("%matplotlib inline")
    silencers = ("filterwarnings", "disable_progress_bar", "set_verbosity", "simplefilter")
    assert not [word for cell in code for word in silencers if word in cell.source], (
        f"{path.name} silences warnings or progress bars: they must not appear in the first place"
    )
    counts = [cell.execution_count for cell in code]
    assert None not in counts, f"{path.name}: some code cells were never executed"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: not run top to bottom"
    outputs = [output for cell in code for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}"
    warnings = [output.text for output in outputs if output.output_type == "stream" and output.name == "stderr"]
    assert not warnings, f"{path.name}: committed with stderr output (warnings, progress bars): {warnings[0][:200]}"
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3, f"{path.name}: expected its figures in the outputs, found {len(images)}"


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    copy = tmp_path / path.name
    shutil.copy(path, copy)
    book = nbformat.read(copy, as_version=4)
    # The kernel inherits this environment: no model hub, and one thread per process on shared cores.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = NotebookClient(
        book,
        timeout=CELL_TIMEOUT_SECONDS,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    nbformat.write(book, copy)
    outputs = [output for cell in book.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)
