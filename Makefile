# Two commands do everything: `make demo` and `make test` (both create .venv when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-throughput clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m semiseg demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout 600

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench-throughput: $(STAMP)
	$(PY) -m semiseg bench throughput

clean:
	rm -rf runs .pytest_cache
