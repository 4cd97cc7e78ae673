# Two entry points: `make run` (install + serve on http://127.0.0.1:8000) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := chromium fonts-wqy-microhei docker-compose

.PHONY: install dev system-deps lint run test bench docker-check clean

# `make run` installs the torch extra: the design's TorchScript runtime, and what exports the
# built-in ResNet-18 on first start. `pip install .` alone is the slim, torch-free server.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Debian packages the tests use: Chromium for the web page (with a CJK font so the Chinese UI
# renders) and docker-compose to validate docker-compose.yml (no Docker engine is needed).
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { \
	  echo "installing $(SYSTEM_PACKAGES) for the tests"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); }

run: install
	$(VENV)/bin/resnet-serve serve --host $(HOST) --port $(PORT)

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks

test: dev system-deps lint
	$(PY) -m pytest

bench: dev
	$(PY) benchmarks/http_bench.py --spawn --concurrency 1 8 32 --duration 15

# Builds resnet-serve:slim and resnet-serve:torch and checks them for real (see deploy/docker/check.py);
# installs and starts the Docker engine here when it is missing (needs root).
docker-check: dev
	$(PY) deploy/docker/check.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
