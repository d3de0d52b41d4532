# The README's two commands. Both build a virtual environment in .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a lighthouse on a cliff at dusk, oil painting

.PHONY: demo test install install-test lint benchmarks-md

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned: on the project's CPU machines this takes the CPU wheel instead of several GB of CUDA packages.
install: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .

install-test: install
	$(BIN)/python -m pip install -q -e ".[test]"

demo: install
	$(BIN)/zimage-lite run "$(PROMPT)" --model demo --seed 42 --out demo.png --force

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check zimage_lite quantize tests benchmarks

# BENCHMARKS.md is generated from the measured rows, never typed by hand.
benchmarks-md:
	$(BIN)/python benchmarks/report.py benchmarks/results/*.json > BENCHMARKS.md
