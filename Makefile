# Two front-door commands: `make demo` and `make test`. Both create .venv and install torch 2.13.0 FIRST, so the
# package's torch range is already satisfied and pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
TORCH := torch==2.13.0

.PHONY: demo test test-slow bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/gptforge demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/train_throughput.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench tools

clean:
	rm -rf $(VENV) runs .pytest_cache
