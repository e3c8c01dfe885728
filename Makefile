# One-line entry points. `make demo` and `make test` set everything up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WORK    ?= work/demo
DATA    ?= work/demo-data
RUN     ?= main
PROFILE ?= fast
SCORE   ?= $(DATA)/capsule/test
BUNDLE  ?= work/bundle-$(RUN)
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: setup test test-fast extract train evaluate score export deploy-run status demo bench clean-work

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	# torch 2.14.1 + torchvision 0.29.1: the only pair with a working torchvision on these machines
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install -q -e ".[test,backbones]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, timm, zarr, faiss, dask.distributed, onnxruntime, pipeline.cli, clad_run.cli"
	@rm -f $(VENV)/.installed-*; touch $@

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15

# The unit tests alone (no workspace, subprocess, backbone or real data): a loop of a
# minute or two on 2 cores. Tests are marked `slow` in tests/conftest.py. CI runs `make test`.
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

$(DATA):
	$(BIN)/clad demo-data $(DATA)

$(WORK)/config.toml: | $(DATA)
	$(BIN)/clad init $(WORK) --data $(DATA)

extract: setup $(WORK)/config.toml
	$(BIN)/clad extract $(WORK)

train: setup
	$(BIN)/clad train $(WORK) --run $(RUN) --profile $(PROFILE)

evaluate: setup
	$(BIN)/clad evaluate $(WORK) --run $(RUN)

score: setup
	$(BIN)/clad score $(WORK) --run $(RUN) $(SCORE)

export: setup
	$(BIN)/clad export $(WORK) --run $(RUN) --out $(BUNDLE)

deploy-run: setup
	$(BIN)/clad-run $(BUNDLE) $(SCORE) --out $(BUNDLE)-scores --verify

status: setup
	$(BIN)/clad status $(WORK)

demo: setup $(DATA)
	@test -f $(WORK)/config.toml || $(BIN)/clad init $(WORK) --data $(DATA)
	$(BIN)/clad extract $(WORK)
	$(BIN)/clad train $(WORK) --run $(RUN) --profile $(PROFILE)
	$(BIN)/clad evaluate $(WORK) --run $(RUN)

bench: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/train_stream.py

clean-work:
	rm -rf work
