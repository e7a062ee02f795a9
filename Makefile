# kprune: a thin Makefile. Targets name what to do; Python does it.
# `make help` lists the targets. SET="SYM=value ..." overrides .config
# options (names without CONFIG_) before a target runs.

.DEFAULT_GOAL := train
SHELL := /bin/bash
PYTHON ?= python3
# VENV= (empty) runs PYTHON as it is, e.g. a GPU node's own Python with its CUDA torch:
# nothing is installed, scripts.check_env names what is missing and the pip command.
VENV := .venv
ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
STAMP := check-env
REQUIRE := $(PY) -m scripts.check_env
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQUIRE := $(PY) -m pip install --quiet -r
endif
KCONFIG := $(PY) -m scripts.kconfig
DEFCONFIGS := $(notdir $(wildcard defconfigs/*))

# What users give (SET="...", RESULTS=dir, DATA_PATH=...) reaches the Python
# programs through the environment, as KPRUNE_<name>, never on a shell command
# line; $(value ...) keeps make from expanding it as well. So no character of
# it is syntax to make or to a shell: a quote, $(...), a backquote, a ; or a
# line break arrives as itself, and the program accepts it or says what is wrong.
USER_VARIABLES := SET RESUME RESULTS JOBS DATA_DIR DATASET DATA_PATH TEXT_FIELD MAX_DOCS PYTEST_ARGS \
                  PROMPT MAX_NEW_TOKENS TEMPERATURE TOP_K SAMPLE_SEED
$(foreach v,$(USER_VARIABLES),$(eval override $(v) := $$(value $(v)))$(eval export KPRUNE_$(v) := $$($(v))))

.PHONY: help install install-trackers train resume demo test test-fast clean menuconfig olddefconfig savedefconfig \
        list-defconfigs check-config command schedule test-matrix matrix-status matrix-cancel sbatch-train plots compare export evaluate sample \
        data-cifar10 data-cifar100 data-gpt2 bench bench-pruning bench-train bench-inference check-env check-gpu bench-gpu \
        $(addprefix defconfig-,$(DEFCONFIGS))

help:
	@echo "kprune make targets"
	@echo "  install            create .venv with the pinned requirements (every target does this first)"
	@echo "  install-trackers   also install the optional trackers (W&B, trackio, TensorBoard): requirements-trackers.txt"
	@echo "  demo               install, run the demo A/B (bitter7 vs magnitude), plots and report"
	@echo "  defconfig-<name>   write .config from defconfigs/<name> (make list-defconfigs)"
	@echo "  menuconfig         edit .config in a terminal menu"
	@echo "  olddefconfig       update .config: options it lacks take their defaults"
	@echo "  savedefconfig      write ./defconfig, the minimal form of .config"
	@echo "  list-defconfigs    list the defconfigs"
	@echo "  check-config       validate .config"
	@echo "  command            print the trainer command .config gives"
	@echo "  schedule           print the sparsity .config reaches at each mask update; plot it"
	@echo "  train (default)    run the trainer .config selects; last line: results: <dir>"
	@echo "  resume             continue an interrupted run from its checkpoint: RESUME=<run dir> (default: the newest)"
	@echo "  pretrain           train defconfigs/gpt2-pretrain-shakespeare (replaces .config) and export it: the oneshot-ab start"
	@echo "  test-matrix        run every combination the matrix menu selects (JOBS=N at once; resumes)"
	@echo "                     (MATRIX_EXECUTOR=slurm: submit one Slurm job array and return)"
	@echo "  matrix-status      each run of the newest matrix (or RESULTS=dir): state, Slurm task"
	@echo "  matrix-cancel      cancel the newest matrix's (or RESULTS=dir) queued and running Slurm tasks"
	@echo "  sbatch-train       submit make train as a Slurm job (DDP_NNODES nodes, one torchrun each)"
	@echo "  plots              plots and report.md for the newest matrix (or RESULTS=dir)"
	@echo "  compare            one report over two or more matrices: RESULTS=\"<dir> <dir>\" (into a new compare-<time>/)"
	@echo "  export             a run's final model into <run>/export/ (safetensors, masks, config; GPT-2: hf/; channel: small/): RESULTS=<run dir>"
	@echo "  evaluate           val_loss and accuracy of a run's final model, or of its export/small: RESULTS=<dir>"
	@echo "  sample             text from a GPT-2 run's final model: RESULTS=<run dir> PROMPT=\"...\" [MAX_NEW_TOKENS TEMPERATURE TOP_K SAMPLE_SEED]"
	@echo "  bench              benchmarks: bench-pruning (124M-shaped layers), bench-train (demo GPT-2), bench-inference"
	@echo "  bench-inference    forward latency and memory: dense vs pruned 124M-shaped GPT-2, or a run's model (RESULTS=<run dir>)"
	@echo "  check-gpu          pass/fail of every CUDA path on this machine's GPU (says so and exits 0 without one)"
	@echo "  bench-gpu          GPT-2 124M tokens/s and MFU on the GPU, dense and pruned, 2:4 latency, and the"
	@echo "                     optimizer step: kprune's masked/unmasked vs torch's fused AdamW"
	@echo "  data-cifar10       download and verify CIFAR-10 into data/cifar/ (also data-cifar100)"
	@echo "  data-gpt2          prepare GPT-2 tokens: DATASET=finewebedu|tinystories|openwebtext|custom [DATA_PATH=...]"
	@echo "  test               run the test suite"
	@echo "  test-fast          run the tests not marked slow (under a minute)"
	@echo "  clean              remove results/, prepared data and caches (keeps .venv and .config)"
	@echo "Overrides: make train SET=\"MAX_ITERS=100 LR=3e-4\" (validated, written to .config first)"
	@echo "An existing Python instead of .venv: make <target> PYTHON=python3 VENV="

install: $(STAMP)

ifeq ($(strip $(VENV)),)
check-env:
	@$(PY) -m scripts.check_env

install-trackers: check-env
	@$(REQUIRE) requirements-trackers.txt
else
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

# Optional: the experiment trackers of the Tracking menu (W&B, trackio, TensorBoard).
install-trackers: $(VENV)/.trackers-installed

$(VENV)/.trackers-installed: requirements-trackers.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-trackers.txt
	@touch $@
endif

$(addprefix defconfig-,$(DEFCONFIGS)): defconfig-%: $(STAMP)
	@$(KCONFIG) defconfig $*

list-defconfigs: $(STAMP)
	@$(KCONFIG) list

menuconfig: $(STAMP)
	@KCONFIG_CONFIG=.config srctree=. $(PY) -m menuconfig Kconfig
	@$(KCONFIG) check

olddefconfig savedefconfig: $(STAMP)
	@$(KCONFIG) $@

check-config: $(STAMP)
	@$(KCONFIG) check

command: $(STAMP)
	@$(KCONFIG) command

schedule: $(STAMP)
	@$(PY) -m scripts.schedule

test-matrix: $(STAMP)
	@$(PY) -m scripts.matrix

matrix-status matrix-cancel: matrix-%: $(STAMP)
	@$(PY) -m scripts.matrix_jobs $*

sbatch-train: $(STAMP)
	@$(PY) -m scripts.sbatch_train

data-cifar10 data-cifar100: data-%: $(STAMP)
	@$(PY) -m scripts.fetch_data $*

# DATASET=finewebedu|tinystories|openwebtext|custom, DATA_PATH=<file or folder> for custom.
# The hub corpora (lib/data/corpora.py HUB_DATASETS) need requirements-hub.txt.
HUB_DATASETS := finewebedu tinystories openwebtext
data-gpt2: $(STAMP)
	@$(if $(filter $(HUB_DATASETS),$(DATASET)),$(REQUIRE) requirements-hub.txt)
	@$(PY) -m scripts.prepare_gpt2_data

bench: bench-pruning bench-train bench-inference

bench-pruning: $(STAMP)
	@$(PY) -m bench.pruning

# RESULTS=<run dir>: the run's model against its smaller self (bench/inference.py).
bench-inference: $(STAMP)
	@$(PY) -m bench.inference

# Both say so and exit 0 on a machine without CUDA.
check-gpu: $(STAMP)
	@$(PY) -m scripts.check_gpu

bench-gpu: $(STAMP)
	@$(PY) -m bench.gpu

bench-train: $(STAMP) install-trackers  # its tracker arm runs W&B, trackio and TensorBoard
	@$(PY) -m bench.train

plots: $(STAMP)
	@$(PY) -m scripts.plots

# RESULTS reaches the program as KPRUNE_RESULTS (see USER_VARIABLES), never on a shell line.
compare: $(STAMP)
	@$(PY) -m scripts.compare

train: $(STAMP)
	@$(KCONFIG) train

# RESULTS, SET, PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, SAMPLE_SEED arrive through the environment (USER_VARIABLES).
sample export evaluate: $(STAMP)
	@$(PY) -m scripts.$@

# Without RESUME: the newest interrupted run in OUTPUT_DIR.
resume: $(STAMP)
	@$(KCONFIG) resume

# The pretrained GPT-2 the oneshot-ab matrix starts from (results/gpt2-pretrain-shakespeare/export/hf).
.PHONY: pretrain
pretrain: export KPRUNE_RESULTS := results/gpt2-pretrain-shakespeare
pretrain: $(STAMP)
	@$(KCONFIG) defconfig gpt2-pretrain-shakespeare
	@KPRUNE_SET= $(KCONFIG) train
	@$(PY) -m scripts.export

demo: export KPRUNE_JOBS := $(or $(JOBS),2)
demo: export KPRUNE_RESULTS :=
demo: $(STAMP)
	@$(KCONFIG) defconfig demo
	@KPRUNE_SET= $(PY) -m scripts.matrix
	@$(PY) -m scripts.plots

# PYTEST_ARGS reaches pytest as PYTEST_ADDOPTS, which pytest splits itself: no shell sees it.
# Two pytest-xdist workers, a test file at a time, all of tests/slurm/ on one (tests/worker_groups.py);
# PYTEST_ARGS="-n 0" runs the suite in one process.
PARALLEL_TESTS := -n 2 --dist loadfile -p tests.worker_groups
# The tracker tests run against the real packages (never skipped), so the suite installs them first.
test: $(STAMP) install-trackers
	@$(if $(strip $(VENV)),,$(PY) -m scripts.check_env --tests &&) PYTEST_ADDOPTS="$(PARALLEL_TESTS) $${PYTEST_ADDOPTS:-} $$KPRUNE_PYTEST_ARGS" $(PY) -m pytest

test-fast: $(STAMP) install-trackers
	@$(if $(strip $(VENV)),,$(PY) -m scripts.check_env --tests &&) PYTEST_ADDOPTS="$(PARALLEL_TESTS) $${PYTEST_ADDOPTS:-} $$KPRUNE_PYTEST_ARGS" $(PY) -m pytest -m "not slow"

clean:
	rm -rf results data/prepared .pytest_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
