# Two commands on a fresh clone (Python 3.11+ and make):
#   make demo   - the main job on the embedded stack
#   make test   - lint, types and the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# checkov (the Terraform security scan in the tests) pins much of its own dependency tree:
# it gets a venv of its own
TOOLS := $(VENV)/tools
CHECKOV_VERSION := 3.3.30
TOOLS_STAMP := $(TOOLS)/.installed-$(CHECKOV_VERSION)

.PHONY: demo up test lint types pytest proto bench faults clean install

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Myelin needs Python 3.11 or newer")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

$(TOOLS_STAMP):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "checkov==$(CHECKOV_VERSION)"
	@touch $(TOOLS_STAMP)

install: $(STAMP) $(TOOLS_STAMP)

demo: $(STAMP)
	$(BIN)/myelin demo

up: $(STAMP)
	$(BIN)/myelin up

lint: $(STAMP)
	$(BIN)/ruff check .

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/pytest

test: lint types pytest

proto: $(STAMP)
	$(BIN)/python -m myelin.tools.protogen

bench: $(STAMP)
	@for m in $$(cd bench && ls *_bench.py | sed 's/\.py$$//'); do echo "== bench/$$m.py"; $(BIN)/python -m bench.$$m || exit 1; done

# The fault harness at full length (every fault, a 60 s warehouse outage), then a 10-minute
# soak with mixed faults; each prints its report and fails if anything was lost or doubled.
faults: $(STAMP)
	$(BIN)/python -m faults.harness --mode full
	$(BIN)/python -m faults.harness --mode soak --minutes 10

clean:
	rm -rf .myelin .pytest_cache .mypy_cache .ruff_cache
