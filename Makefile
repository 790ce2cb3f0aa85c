# The README's commands. `make demo` and `make test` each set up everything they need
# on a fresh machine (a virtual environment in .venv), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := $(shell find pipeline workers schemas -name '*.py' -o -name 'py.typed') pyproject.toml

.PHONY: install demo test test-all lint bench clean

# CPU torch first, from its pinned release: otherwise a dependency pulls a CUDA build.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q ".[test,demo]"
	touch $@

# actcache itself is installed as a regular (non-editable) package, as users get it.
$(VENV)/.actcache: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.actcache

demo: install
	$(BIN)/actcache cache examples/cities.yaml
	$(BIN)/actcache probe runs/cities.zarr --label label --split-column split --out runs/cities-probes

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pipeline workers schemas tests benchmarks examples
	$(BIN)/mypy -p actcache

bench: install
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_codec.py

clean:
	rm -rf $(VENV) runs build *.egg-info
