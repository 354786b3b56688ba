# Quick start: `make demo` (set-up, then the main job) and `make test` (set-up, then the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

# torch==2.13.0 is a CPU build that lies on this machine kind's disk; a plain `torch` would
# download a CUDA build of several GB. Skip it when the venv already has a torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnfallback demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build dist src/*.egg-info
