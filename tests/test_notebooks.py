"""The notebooks run top to bottom (nbclient), and each .ipynb matches its paired jupytext .py."""

import pathlib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def code_cells(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ["quickstart"])
def test_notebook_is_paired_and_executes(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert code_cells(nb) == code_cells(jupytext.read(NOTEBOOKS / f"{name}.py")), \
        f"{name}.ipynb is out of sync: run `jupytext --sync notebooks/{name}.py`"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "IndexCache 1/2" in outputs and "max |score - log_softmax(forward)|" in outputs
    error = float(outputs.split("max |score - log_softmax(forward)|:")[1].split()[0])
    assert error < 1e-4
