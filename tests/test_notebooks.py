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


def test_indexcache_search_notebook_is_paired_and_executes():
    """The embedded model's search notebook: in sync, runs, and prints a full-DSA bits per byte below 1.8 (a uniform
    guess over the 4096-token vocabulary scores ~3.3 on this text; the shipped model ~1.4 at 512 tokens)."""
    nb = nbformat.read(NOTEBOOKS / "indexcache_search.ipynb", as_version=4)
    assert code_cells(nb) == code_cells(jupytext.read(NOTEBOOKS / "indexcache_search.py")), \
        "indexcache_search.ipynb is out of sync: run `jupytext --sync notebooks/indexcache_search.py`"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "searched 1/4:" in outputs and "uniform 1/4" in outputs
    full_bpb = float(outputs.split("full DSA")[1].split("bits/byte")[1].split()[0])
    assert 0 < full_bpb < 1.8


def test_benchmarks_notebook_is_paired_and_executes():
    """The end-to-end sweeps' notebook: in sync, runs, and names each committed sweep with its device."""
    nb = nbformat.read(NOTEBOOKS / "benchmarks.ipynb", as_version=4)
    assert code_cells(nb) == code_cells(jupytext.read(NOTEBOOKS / "benchmarks.py")), \
        "benchmarks.ipynb is out of sync: run `jupytext --sync notebooks/benchmarks.py`"
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "e2e_cpu_smoke:" in outputs and "cut model (smoke run)" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
