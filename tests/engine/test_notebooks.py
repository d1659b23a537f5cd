"""Notebooks under notebooks/ execute top to bottom on the embedded model (the seed tutorial's
examples live in quickstart.ipynb)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb")))
def test_notebook_executes(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
