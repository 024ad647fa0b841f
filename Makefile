# Self-contained entry points: each sets up .venv on first use.
#   make test                              run the test suite
#   make study DATASET=mnist               train BN+L1, GN, LN from scratch into runs/mnist/, print
#                                          the comparison table and where the report is
#                                          (OUT=... to choose the folder)
#   make results DATASET=mnist             regenerate the committed bench/results/mnist/ (retrains)
# DATA=DIR says where the datasets are (default: $NORMCLI_DATA, else ./data); a relative DIR
# is taken from this folder, the clone's root.
VENV ?= .venv
PYTHON ?= python3
DATASET ?= mnist
DATA ?= $(or $(NORMCLI_DATA),data)
OUT ?= runs/$(DATASET)
BIN = $(VENV)/bin

.PHONY: install test study results lint

install: $(BIN)/normcli

$(BIN)/normcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

test: install
	$(BIN)/python -m pytest -q

study: install
	PATH="$(abspath $(BIN)):$$PATH" examples/compare_norms.sh $(DATASET) --data-dir "$(abspath $(DATA))" --out $(OUT)

results: install
	PATH="$(abspath $(BIN)):$$PATH" examples/compare_norms.sh $(DATASET) --data-dir "$(abspath $(DATA))" --out bench/results/$(DATASET) --fresh

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check normcli tests bench
