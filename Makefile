# Self-contained entry points: each sets up .venv on first use.
#   make test                  run the test suite
#   make study DATASET=mnist   the whole BN+L1 / GN / LN comparison (examples/compare_norms.sh)
VENV ?= .venv
PYTHON ?= python3
DATASET ?= mnist
DATA ?= $(or $(NORMCLI_DATA),data)
BIN = $(VENV)/bin

.PHONY: install test study lint

install: $(BIN)/normcli

$(BIN)/normcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

test: install
	$(BIN)/python -m pytest -q

study: install
	PATH="$(abspath $(BIN)):$$PATH" examples/compare_norms.sh $(DATASET) --data-dir $(DATA)

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check normcli tests bench
