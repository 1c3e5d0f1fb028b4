# Two front-door commands: `make demo` and `make test`. Both create .venv and install torch 2.13.0 FIRST, so the
# package's torch range is already satisfied and pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
TORCH := torch==2.13.0

.PHONY: demo test test-slow bench bench-data bench-serve bench-compress browser lint clean

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

# The web chat page's end-to-end test drives Debian's headless Chromium; it runs in CI, never skipped
# (GPTFORGE_REQUIRE_BROWSER=1 turns a missing browser into a failure). Installed once, as root or through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null )

test: $(VENV)/.installed-dev browser
	GPTFORGE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

# The slow tests also check the exports in their consumers: lm-evaluation-harness (installed here) and llama.cpp through
# llama-cpp-python (a 10-minute compile, so only when already installed: `$(BIN)/pip install llama-cpp-python`).
test-slow: $(VENV)/.installed-dev
	$(PIP) install -q 'ray[serve]>=2.47' 'lm-eval[hf]>=0.4'
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/train_throughput.py

# Needs the demo's trained model (runs/demo): `make demo` first.
bench-compress: $(VENV)/.installed-dev
	@test -d runs/demo/pretrain/tokens || $(BIN)/gptforge demo
	$(BIN)/python bench/compress.py

bench-serve: $(VENV)/.installed-dev
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/serve_load.py

# The data pipeline benchmark runs datatrove from its own environment: it is never a dependency of gptforge.
DT_VENV := .bench-venv/datatrove
$(DT_VENV)/bin/python:
	$(PYTHON) -m venv $(DT_VENV)
	$(DT_VENV)/bin/python -m pip --disable-pip-version-check -q install datatrove orjson spacy 'xxhash<4' regex tokenizers jieba

bench-data: $(VENV)/.installed-dev $(DT_VENV)/bin/python
	DATATROVE_PYTHON=$(DT_VENV)/bin/python $(BIN)/python bench/data_pipeline.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench tools

clean:
	rm -rf $(VENV) .bench-venv runs .pytest_cache
