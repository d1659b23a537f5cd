# Each target sets itself up: scripts/bootstrap.sh makes .venv with a Python >= 3.12 found on the
# machine (PATH, then pyenv) and installs the project; repeated runs reuse it.
PY := .venv/bin/python

.PHONY: setup demo serve test test-all test-fast clean

setup:
	bash scripts/bootstrap.sh test

demo: setup
	$(PY) -m jaxpaged.demo $(ARGS)

serve: setup
	$(PY) -m jaxpaged.serve $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests $(ARGS)

# the whole suite, including the tests marked `exhaustive`
test-all: setup
	JAXPAGED_TEST_ALL=1 $(PY) -m pytest -q -p no:cacheprovider tests $(ARGS)

clean:
	rm -rf .venv
