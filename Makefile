# The two README commands live here, so CI and people run exactly the same thing.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint typecheck check

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[hf,lmeval,dev]'

# Until `qualgate run` lands (pipeline issue): what is installed, one lossy stack against the committed
# golden baseline, and one lossless layer checked for greedy equivalence.
demo: install
	$(PYTHON) -m qualgate info
	$(PYTHON) -m qualgate fidelity golden/bundled-target --layer kind=weight_quant,method=rtn,bits=4 \
		--layer kind=kv_quant,method=fp8
	$(PYTHON) -m qualgate equivalence --layer kind=speculation,method=draft_model \
		--prompts evals/prompts/general.jsonl --max-new-tokens 32

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check qualgate tests benchmarks
	ruff format --check qualgate tests benchmarks

typecheck:
	mypy

check: lint typecheck test
