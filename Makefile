# The two README commands live here, so CI and people run exactly the same thing.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint typecheck check

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[hf,lmeval,judge,llamacpp,dev]'

# The main job on the bundled default: pipelines/demo.yaml (exit 0 pass/warn, 1 gate failed).
demo: install
	$(PYTHON) -m qualgate run

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check qualgate tests benchmarks
	ruff format --check qualgate tests benchmarks

typecheck:
	mypy

check: lint typecheck test
