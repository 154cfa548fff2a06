# Two commands for a fresh machine:  `make run` (default FedMe experiment)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONF ?= conf/fedme-digits.toml

# Tests run in parallel workers: most of a Flower test's time is waiting (start-ups, polling),
# so more workers than cores overlap well; `make test-fast` runs every test that starts no
# Flower process (the edit loop). `--dist worksteal` measured fastest of the schedules tried
# (docs/testing.md).
TEST_WORKERS ?= 4

.PHONY: setup run test test-fast lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m fedapps.launch $(CONF)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist worksteal

lint: setup
	$(BIN)/ruff check .
