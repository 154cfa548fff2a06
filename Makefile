# Two commands for a fresh machine:  `make run` (default FedMe experiment)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONF ?= conf/fedme-digits.toml

.PHONY: setup run test lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m fedapps.launch $(CONF)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
