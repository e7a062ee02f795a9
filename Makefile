# kprune: a thin Makefile. Targets name what to do; Python does it.
# `make help` lists the targets. SET="SYM=value ..." overrides .config
# options (names without CONFIG_) before a target runs.

.DEFAULT_GOAL := train
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KCONFIG := $(PY) -m scripts.kconfig
DEFCONFIGS := $(notdir $(wildcard defconfigs/*))

.PHONY: help install train resume demo test clean menuconfig olddefconfig savedefconfig \
        list-defconfigs check-config command schedule test-matrix matrix-status matrix-cancel sbatch-train plots data-cifar10 data-cifar100 data-gpt2 bench bench-pruning bench-train \
        $(addprefix defconfig-,$(DEFCONFIGS))

help:
	@echo "kprune make targets"
	@echo "  install            create .venv with the pinned requirements (every target does this first)"
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
	@echo "  resume             continue an interrupted run from its checkpoint: RESUME=<run dir>"
	@echo "  test-matrix        run every combination the matrix menu selects (JOBS=N at once; resumes)"
	@echo "                     (MATRIX_EXECUTOR=slurm: submit one Slurm job array and return)"
	@echo "  matrix-status      each run of the newest matrix (or RESULTS=dir): state, Slurm task"
	@echo "  matrix-cancel      cancel the newest matrix's (or RESULTS=dir) queued and running Slurm tasks"
	@echo "  sbatch-train       submit make train as a Slurm job (DDP_NNODES nodes, one torchrun each)"
	@echo "  plots              plots and report.md for the newest matrix (or RESULTS=dir)"
	@echo "  bench              benchmarks: bench-pruning (124M-shaped layers), bench-train (demo GPT-2)"
	@echo "  data-cifar10       download and verify CIFAR-10 into data/cifar/ (also data-cifar100)"
	@echo "  data-gpt2          prepare GPT-2 tokens: DATASET=finewebedu|tinystories|openwebtext|custom [DATA_PATH=...]"
	@echo "  test               run the test suite"
	@echo "  clean              remove results/, prepared data and caches (keeps .venv and .config)"
	@echo "Overrides: make train SET=\"MAX_ITERS=100 LR=3e-4\" (validated, written to .config first)"

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(addprefix defconfig-,$(DEFCONFIGS)): defconfig-%: $(STAMP)
	@$(KCONFIG) defconfig $* --set '$(SET)'

list-defconfigs: $(STAMP)
	@$(KCONFIG) list

menuconfig: $(STAMP)
	@KCONFIG_CONFIG=.config srctree=. $(PY) -m menuconfig Kconfig
	@$(KCONFIG) check

olddefconfig savedefconfig: $(STAMP)
	@$(KCONFIG) $@ --set '$(SET)'

check-config: $(STAMP)
	@$(KCONFIG) check --set '$(SET)'

command: $(STAMP)
	@$(KCONFIG) command --set '$(SET)'

schedule: $(STAMP)
	@$(PY) -m scripts.schedule --set '$(SET)'

test-matrix: $(STAMP)
	@$(PY) -m scripts.matrix --set '$(SET)' --jobs '$(JOBS)' --results '$(RESULTS)'

matrix-status matrix-cancel: matrix-%: $(STAMP)
	@$(PY) -m scripts.matrix_jobs $* --results '$(RESULTS)'

sbatch-train: $(STAMP)
	@$(PY) -m scripts.sbatch_train --set '$(SET)'

data-cifar10 data-cifar100: data-%: $(STAMP)
	@$(PY) -m scripts.fetch_data $* --data-dir '$(or $(DATA_DIR),data)'

# DATASET=finewebedu|tinystories|openwebtext|custom, DATA_PATH=<file or folder> for custom.
data-gpt2: $(STAMP)
	@test -n "$(DATASET)" || { echo "usage: make data-gpt2 DATASET=finewebedu|tinystories|openwebtext|custom [DATA_PATH=...]" >&2; exit 2; }
	@$(if $(filter-out custom,$(DATASET)),$(PY) -m pip install --quiet -r requirements-hub.txt)
	@$(PY) -m scripts.prepare_gpt2_data --dataset '$(DATASET)' --data-dir '$(or $(DATA_DIR),data)' \
		$(if $(DATA_PATH),--data-path '$(DATA_PATH)') $(if $(TEXT_FIELD),--text-field '$(TEXT_FIELD)') \
		$(if $(MAX_DOCS),--max-docs '$(MAX_DOCS)')

bench: bench-pruning bench-train

bench-pruning: $(STAMP)
	@$(PY) -m bench.pruning

bench-train: $(STAMP)
	@$(PY) -m bench.train

plots: $(STAMP)
	@$(PY) -m scripts.plots --results '$(RESULTS)'

train: $(STAMP)
	@$(KCONFIG) train --set '$(SET)'

resume: $(STAMP)
	@test -n "$(RESUME)" || { echo "usage: make resume RESUME=<run directory>" >&2; exit 2; }
	@$(KCONFIG) resume '$(RESUME)' --set '$(SET)'

demo: $(STAMP)
	@$(KCONFIG) defconfig demo --set '$(SET)'
	@$(PY) -m scripts.matrix --jobs '$(or $(JOBS),2)'
	@$(PY) -m scripts.plots

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf results data/prepared .pytest_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
