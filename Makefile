# One entry point for a fresh machine with only Python 3.11.
# `make test` builds .venv on first use (torch CPU build first), then lint, types, tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.survfuse-installed

.PHONY: test test-slow lint venv clean demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU build on local disk; a bare `torch` would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

test: lint
	$(VENV)/bin/pytest -q

test-slow: venv
	$(VENV)/bin/pytest -q -m slow

# The whole study in one command: simulate 3,000 patients, run examples/demo.yaml, write
# demo_out/run/report.html and summary.md, print the C-index table.
demo: venv
	$(VENV)/bin/survfuse demo --out demo_out

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
