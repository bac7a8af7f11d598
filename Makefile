# Two entry points on a fresh machine: `make demo` (the main job on the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup setup-test clean

# torch is installed first and pinned: on CPU-only machines `torch==2.13.0` resolves to the local CPU wheel,
# while an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

# Tests also need llama.cpp (llama-cpp-python builds it from source, ~4 minutes on 2 cores) as a reference,
# and matplotlib for benchmark plots.
$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,llama,bench]'
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	$(BIN)/edgelm pull gemma-3-270m
	$(BIN)/edgelm generate -m gemma-3-270m -p "The Eiffel Tower is located in the city of" -n 48 --temp 0
	$(BIN)/edgelm bench -m gemma-3-270m -p 128 -n 32 --reps 1 --brief

test: setup-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
