"""Every notebook of ``notebooks/`` runs top to bottom in a real Jupyter kernel (nbclient).

The kernel is ipykernel's ``python3``, which jupyter_client starts with this test's own
interpreter (its spec says ``python``, replaced by ``sys.executable``), so the notebooks
see the dfre being tested. Notebooks assert their own results; a failing cell fails the
test with the cell's error. Committed notebooks carry no outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT = 300


def _kernel_runs_this_python() -> None:
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no '{KERNEL}' Jupyter kernel: install ipykernel (pip install -e '.[dev]')")
    command = spec.argv[0]
    if command not in ("python", "python3", sys.executable):
        pytest.fail(
            f"the '{KERNEL}' kernel runs {command}, not {sys.executable}: remove that kernelspec "
            f"({spec.resource_dir}) or run `{sys.executable} -m ipykernel install --sys-prefix`"
        )


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    _kernel_runs_this_python()
    book = nbformat.read(path, as_version=4)
    stale = [i for i, c in enumerate(book.cells) if c.cell_type == "code" and c.outputs]
    assert not stale, f"{path.name}: clear the outputs of cells {stale} before committing"
    client = NotebookClient(
        book,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert figures >= 1, f"{path.name} drew no figure"
