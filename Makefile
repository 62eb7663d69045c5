# The two README commands live here, so CI and people run exactly the same thing.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint typecheck check mutation

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[hf,lmeval,judge,llamacpp,ray,dev]'

# The main job on the bundled default: pipelines/demo.yaml (exit 0 pass/warn, 1 gate failed).
demo: install
	$(PYTHON) -m qualgate run

# One worker per core (pytest-xdist), the slow tests first and the tests sharing a module-scoped fixture
# (a server, a logged run) on one worker (tests/conftest.py); `python -m pytest -q` runs them in one process.
test:
	$(PYTHON) -m pytest -q -n auto --dist loadgroup

lint:
	ruff check qualgate tests benchmarks
	ruff format --check qualgate tests benchmarks

typecheck:
	mypy

check: lint typecheck test

# Mutation testing of the gate's own logic: mutmut against the fast unit tests ([tool.mutmut] in
# pyproject.toml); fails below a 90% score (MUTATION_THRESHOLD=85 make mutation to change it).
# MUTATION_ARGS="qualgate/stats.py --max-children 1" runs some of the modules, or with other options.
MUTATION_ARGS ?=
mutation:
	$(PYTHON) scripts/mutation-score $(MUTATION_ARGS)
