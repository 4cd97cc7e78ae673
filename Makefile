# Two entry points: `make run` (install + serve on http://127.0.0.1:8000) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install dev run test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/resnet-serve serve --host $(HOST) --port $(PORT)

test: dev
	$(PY) -m pytest

bench: dev
	$(PY) benchmarks/http_bench.py --spawn --concurrency 1 8 32 --duration 15

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
