# The two commands of the README. Both create the environment (.venv) first if it is absent.
VENV ?= .venv
RECIPE ?= recipes/dlrm_synthetic.yaml

.PHONY: env train test lint

env:
	@VENV=$(VENV) bash scripts/env.sh

train: env
	$(VENV)/bin/lightning-skew fit --config $(RECIPE)

test: env
	$(VENV)/bin/python -m pytest -q

lint: env
	$(VENV)/bin/ruff check lightning_skew tests
