# `make demo` and `make test` each work as the first command on a fresh clone:
# they create .venv and install the pinned dependencies when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
# stages run with the same CPU threads however they are launched, so timings compare
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-fast install mlflow-ui

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

data/raw: | $(STAMP)
	$(BIN)/transferlab data get

# two test images per class for the closing `transferlab predict` example
DEMO_IMAGES := import pandas as p; s = p.read_csv("data/split.csv"); \
	print(" ".join("data/prepared/" + s[s.part == "test"].groupby("label").head(2).path))

demo: $(STAMP) data/raw
	$(BIN)/dvc repro
	$(BIN)/transferlab summary
	@echo
	@echo "The registered champion on a few test images:"
	$(BIN)/transferlab predict $$($(BIN)/python -c '$(DEMO_IMAGES)') --top-k 2
	@echo
	@echo "The report page:     $(abspath reports/index.html)  ($(BIN)/transferlab report --open)"
	@echo "Compare executions:  $(BIN)/transferlab compare"
	@echo "Browse every run:    $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlruns/mlflow.db)"

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlruns/mlflow.db)
