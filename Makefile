# Cohort: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check clean

$(STAMP): pyproject.toml
	bash ops/install.sh
	touch $(STAMP)

install: $(STAMP)

## Start Redis (if none is reachable), workers, beat, Flower, the API and the simulator; run a workload; stop.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m ops.demo $(DEMO_ARGS)

## The whole test suite (real Redis, real Celery processes, the real encoder).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

## Lint and types.
check: $(STAMP)
	$(BIN)/ruff check producers workers compression_jobs ops tests
	$(BIN)/mypy producers workers

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
