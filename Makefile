# Local set-up and the two commands of the README. Everything installs into .venv; the venv is
# rebuilt only when pyproject.toml or this Makefile change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch for laptops and CI. Clusters use their own torch (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.norallm-installed

# DeepSpeed JIT-compiles ops on first use; keep that cache inside the venv.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup smoke test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: otherwise the resolver pulls a multi-GB CUDA build for the other packages.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

smoke: $(STAMP)
	$(BIN)/norallm smoke

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
