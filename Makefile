# Two commands do everything: `make demo` and `make test` (both create .venv when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-throughput clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m semiseg demo

test: $(STAMP) browser
	$(PY) -m pytest -q --timeout 600 -n auto --durations=15

# Headless Chromium for the report's browser test; installed with apt where possible, else the test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  command -v apt-get >/dev/null 2>&1 && \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update >/dev/null 2>&1 && \
	      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium not installed (no apt-get or no root): the report browser test will be skipped"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench-throughput: $(STAMP)
	$(PY) -m semiseg bench throughput

clean:
	rm -rf runs .pytest_cache
