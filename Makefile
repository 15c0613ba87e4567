# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
BUF := scripts/node_modules/.bin/buf

.PHONY: install demo test lint check-stubs stubs bench clean

install: $(VENV)/.installed scripts/node_modules/.installed clients/node/node_modules/.installed

$(VENV)/.installed: pyproject.toml stubs/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e stubs -e 'clients/python[postgresql]' -e '.[dev]'
	touch $@

scripts/node_modules/.installed: scripts/package.json scripts/package-lock.json
	cd scripts && npm ci --silent --no-audit --no-fund
	touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --silent --no-audit --no-fund
	touch $@

## The main job: onboard a corporate client, once succeeding and once compensating.
demo: install
	$(BIN)/python scripts/demo.py

## Lint, type checks, layer contracts, the contract's lint, stubs drift, then every test:
## the Node.js SDK's with Node's own runner, then the Python suite (which runs Node processes).
test: install lint
	cd clients/node && npm test --silent
	$(BIN)/python -m pytest -q

lint: install check-stubs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BUF) lint
	$(BUF) format --diff --exit-code

## Fails when the committed stubs differ from a fresh regeneration.
check-stubs: install
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/generate_stubs.sh $$tmp/stubs >/dev/null \
	  && diff -r --exclude=__pycache__ $$tmp/stubs/saga stubs/saga \
	  && echo "stubs are up to date"; status=$$?; rm -rf $$tmp; exit $$status

stubs: install
	PYTHON=$(BIN)/python scripts/generate_stubs.sh

## Prints sagas/s and latency percentiles of a loop of four-step sagas on loopback.
bench: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) scripts/node_modules clients/node/node_modules
