#!/usr/bin/env bash
# Wheels the GPU machine's image lacks for the HTTP server (it has no network): FastAPI and what it
# needs, for that image's Python (3.12, x86-64 manylinux), into .whl/ (git-ignored; the device
# tool carries it with `carry: [".whl"]`). On the GPU machine:
#   pip install -q --no-deps --target /tmp/srv .whl/*.whl && PYTHONPATH=.:/tmp/srv python3 -m jaxpaged.serve ...
# (benchmarks/served_vs_offline.sh does that itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
"$PY" -m pip download -q --dest .whl --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp \
    fastapi uvicorn "pydantic>=2" opentelemetry-api
ls .whl
