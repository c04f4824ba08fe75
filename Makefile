# The two README commands: `make test` and `make demo` (each creates .venv with the CPU torch pin).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false
# `make test` runs offline; every other target (the demo above all) may reach the Hub unless the user sets
# HF_HUB_OFFLINE=1 in the environment.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: test demo lint bench clean venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,crf,gradio,detection,selective-search]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check hf_useg tests training benchmarks spaces
	$(TEST_ENV) $(BIN)/pytest -q -ra

demo: $(STAMP)
	$(BIN)/hf-useg demo --output-dir demo_output

lint: $(STAMP)
	$(BIN)/ruff check hf_useg tests training benchmarks spaces
	$(BIN)/ruff format --check hf_useg tests training benchmarks spaces

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) demo_output outputs .pytest_cache
