# Two entry points do all set-up: `make run` (the app) and `make test` (the test suite).
# Both create or reuse the project's own virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel keeps CI small; on a GPU machine run e.g. `make TORCH_SPEC=torch test` to keep your usual build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test test-fast quality style bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PY) -c 'import torch'
	$(PIP) install -e ".[app,dev]"
	$(PY) -c 'import lol_engine, peft, gradio'
	touch $@

run: $(VENV)/.installed
	$(PY) space_app.py

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not gpu"

quality: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

style: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_spectra.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
