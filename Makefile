# Each target sets itself up: scripts/bootstrap.sh makes .venv with a Python >= 3.12 found on the
# machine (PATH, then pyenv) and installs the project; repeated runs reuse it.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# The GPU machine has no network (no .venv there): its own python3, the repository on the path.
GPU_PY ?= python3
# The test files that hold GPU-marked tests (the others import packages the GPU image may lack).
GPU_TESTS = $(shell grep -rl --include='test_*.py' 'mark\.gpu' tests)

.PHONY: setup demo serve test test-all test-gpu notebooks clean

setup:
	bash scripts/bootstrap.sh test

demo: setup
	$(PY) -m jaxpaged.demo $(ARGS)

serve: setup
	$(PY) -m jaxpaged.serve $(ARGS)

# CPU suite (CI); GPU-marked tests skip, tests marked `slow` (exhaustive matrices) wait for test-all.
test: setup
	$(PYTEST) -m "not slow" tests $(ARGS)

# Every CPU test, the `slow` ones included.
test-all: setup
	$(PYTEST) tests $(ARGS)

# On a machine with an NVIDIA GPU: the GPU-marked tests (kernels compiled for the device, the engine
# on the Pallas and Mosaic backends; jax-triton's ablation test skips without jax_triton).
test-gpu:
	JAX_PLATFORMS=cuda PYTHONPATH=. $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu $(GPU_TESTS) $(ARGS)

# Executes every notebooks/*.ipynb in place at the CPU scale, saving outputs and notebooks/figures/*.png
# (NB="notebooks/x.ipynb" for one; JAXPAGED_NOTEBOOK_SCALE=gpu on the GPU machine for the 7B scale).
notebooks: setup
	$(PY) scripts/run_notebooks.py $(NB)

clean:
	rm -rf .venv
