"""Executes the research notebooks with nbclient and saves them with their outputs (plots
included): ``make notebooks`` runs every ``notebooks/*.ipynb`` in place at the CPU scale; name
notebooks to run only those. Figures are written to ``notebooks/figures/`` by the notebooks.

    .venv/bin/python scripts/run_notebooks.py [notebooks/memory.ipynb ...]

``JAXPAGED_NOTEBOOK_SCALE=gpu`` runs them at the scale of the GPU runs instead (figures get a
``_gpu`` suffix); the test suite executes copies (``tests/engine/test_notebooks.py``) and saves nothing.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(paths: list[str]) -> None:
    paths = paths or sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    # The kernels inherit the environment: the repository must be importable from notebooks/.
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        client = NotebookClient(nb, timeout=int(os.environ.get("JAXPAGED_NOTEBOOK_TIMEOUT", "1800")),
                                kernel_name="python3", resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
        client.execute()
        nbformat.write(nb, path)
        print(f"{os.path.relpath(path, ROOT)}: executed and saved in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
