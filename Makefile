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

.PHONY: install test test-triton test-oldest bench example clean

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

# The same tests against the oldest torch segkernels claims (requirements-oldest.txt), on a copy
# of the tracked files whose CPU extension is built in place against that torch, beside the
# main build.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(abspath $(OLDEST_VENV))/bin/python
OLDEST_DIR := build/oldest
OLDEST_STAMP := $(OLDEST_VENV)/.deps-stamp

$(OLDEST_STAMP): requirements-oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -r requirements-oldest.txt
	touch $@

test-oldest: $(OLDEST_STAMP)
	@mkdir -p $(RESULTS)
	rm -rf $(OLDEST_DIR) && mkdir -p $(OLDEST_DIR)
	git ls-files -z | xargs -0 tar -cf - | tar -xf - -C $(OLDEST_DIR)
	cd $(OLDEST_DIR) && SEGKERNELS_BUILD_TESTING=1 SEGKERNELS_SKIP_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} \
		$(OLDEST_PY) setup.py -q build_ext --inplace > build-ext.log 2>&1 || { tail -30 build-ext.log; exit 1; }
	cd $(OLDEST_DIR) && $(OLDEST_PY) -c "import torch, triton, segkernels; assert segkernels.kernels_available(), \
		segkernels.kernel_load_error(); print('oldest: torch', torch.__version__, 'triton', triton.__version__)"
	cd $(OLDEST_DIR) && $(OLDEST_PY) -m pytest tests -q -p no:cacheprovider --junitxml=$(abspath $(RESULTS))/oldest-tests.xml
	cd $(OLDEST_DIR) && TRITON_INTERPRET=1 $(OLDEST_PY) -m pytest tests -q -m triton -p no:cacheprovider \
		--junitxml=$(abspath $(RESULTS))/oldest-triton.xml

bench: install
	$(PY) benchmarks/run.py --out $(BENCH_DIR)

# Regenerates the examples' committed outputs (examples/outputs/): the end-to-end table and figure
# of seed 0 and the tables of seeds 1 and 2 (about a minute a seed on 2 cores), and the domain
# transfer table over 5 seeds (about 5 minutes), the dense-prediction blocks' table over 5 seeds
# (under a minute), each naming the commit and machine it ran on.
EXAMPLE_OUT := examples/outputs
example: install
	@mkdir -p $(EXAMPLE_OUT)
	$(PY) examples/segnet_end_to_end.py --seed 0 --out $(EXAMPLE_OUT)/segnet_end_to_end.png > $(EXAMPLE_OUT)/seed0.txt
	$(PY) examples/segnet_end_to_end.py --seed 1 --out "" > $(EXAMPLE_OUT)/seed1.txt
	$(PY) examples/segnet_end_to_end.py --seed 2 --out "" > $(EXAMPLE_OUT)/seed2.txt
	$(PY) examples/domain_transfer.py > $(EXAMPLE_OUT)/domain_transfer.txt
	$(PY) examples/dense_blocks.py > $(EXAMPLE_OUT)/dense_blocks.txt
	@grep -h -A7 "^| model" $(EXAMPLE_OUT)/seed*.txt

clean:
	rm -rf build segkernels/_C*.so *.egg-info $(OLDEST_VENV)
