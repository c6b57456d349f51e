# landmark_unet — every target installs what it needs into .venv first.
# GPU users: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: help install demo test test-slow lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with torch ($$TORCH) and the package

demo: $(STAMP)  ## phantom -> train 2D U-Net -> evaluate on held-out bodies (5-6 min on 2 CPU cores)
	$(BIN)/python -m landmark_unet.train experiment=demo

test: $(STAMP)  ## the test suite (under 10 min on 2 CPU cores)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## tests marked slow
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check landmark_unet hydra_plugins tests benchmarks

bench: $(STAMP)  ## performance benchmarks (never part of make test)
	$(BIN)/python -m benchmarks.run

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache
