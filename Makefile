# The two commands of the README. Both create the environment (.venv) first if it is absent.
VENV ?= .venv
RECIPE ?= recipes/dlrm_synthetic.yaml

.PHONY: env train test lint

env:
	@VENV=$(VENV) bash scripts/env.sh

train: env
	$(VENV)/bin/lightning-skew fit --config $(RECIPE)

# One pytest-xdist worker per core, each test module on one worker (its module fixtures built once).
test: env
	$(VENV)/bin/python -m pytest -q -n auto --dist loadscope

lint: env
	$(VENV)/bin/ruff check lightning_skew tests
