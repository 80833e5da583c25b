# The two commands a new user needs: `make demo` and `make test`. Both create ./.venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch: the CPU build, pinned. On this machine pip finds the wheel on disk; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint typecheck clean bench-sweep

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgecompress build --target raspberry-pi-5 --force; \
	  code=$$?; if [ $$code -eq 3 ]; then echo "(exit 3: a budget failed; the bundle was still written)"; \
	  elif [ $$code -ne 0 ]; then exit $$code; fi

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check edgecompress tests benchmarks

typecheck: install
	$(VENV)/bin/mypy edgecompress

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache

bench-sweep: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/sweep.py
