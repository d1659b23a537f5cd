"""Every notebook under notebooks/ executes top to bottom at the CPU scale: a cell error or a failed
``assert`` (each notebook checks the figures it computes against their expected ranges) fails the
test, and every figure a notebook saves (``save(fig, "name")``) must have been written. Copies run:
outputs and figures go to a temporary folder, the committed notebooks are left alone."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb")))
def test_notebook_executes(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    figures = tmp_path / "figures"
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("JAXPAGED_FIGURES_DIR", str(figures))
    monkeypatch.setenv("JAXPAGED_NOTEBOOK_SCALE", "cpu")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    wanted = {m for c in nb.cells if c.cell_type == "code" for m in re.findall(r'save\(fig, "(\w+)"\)', c.source)}
    written = {f[:-4] for f in os.listdir(figures) if f.endswith(".png") and os.path.getsize(figures / f) > 0} if wanted else set()
    assert wanted <= written, f"figures not written: {sorted(wanted - written)}"
