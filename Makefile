# `make test` and `make bench` set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP := build/.ext-stamp
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
PYTEST := $(PY) -m pytest
BENCH_DIR ?= benchmarks/results

.PHONY: install test test-triton bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Rebuilds only when a C++/CUDA source or setup.py changed; ninja reuses objects under build/.
# The test-only ops (segkernels_testing) are built in: the tests need them, the benchmarks
# ignore them, and one build serves both.
$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES)
	SEGKERNELS_BUILD_TESTING=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

install: $(EXT_STAMP)

RESULTS := build/test-results

test: install
	@mkdir -p $(RESULTS)
	$(PYTEST) tests -q --junitxml=$(RESULTS)/tests.xml
	$(MAKE) --no-print-directory test-triton

# Triton kernels on CPU tensors under the interpreter (exit 5 = no Triton tests collected).
test-triton: install
	@mkdir -p $(RESULTS)
	TRITON_INTERPRET=1 $(PYTEST) tests -q -m triton --junitxml=$(RESULTS)/triton.xml; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: install
	$(PY) benchmarks/run.py --out $(BENCH_DIR)

clean:
	rm -rf build segkernels/_C*.so *.egg-info
