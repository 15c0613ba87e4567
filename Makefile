# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
BUF := scripts/node_modules/.bin/buf
# The released saga.v1 contract: changes must stay additive (buf's FILE breaking rules).
CONTRACT_BASELINE := scripts/contract/saga-v1-baseline.json

.PHONY: install system demo console test lint check-stubs stubs contract-baseline bench torture \
  torture-replicas load scale million console-scale test-node-package-full clean

install: system $(VENV)/.installed scripts/node_modules/.installed clients/node/node_modules/.installed

# The Go participant (clients/go) is built with Debian's Go toolchain and packages only.
# golang-github-golang-protobuf-1-5-dev by name: without it apt picks protobuf 1.3, whose code
# compiles and then fails at the first call.
GO_PACKAGES := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
  golang-github-golang-protobuf-1-5-dev golang-github-mattn-go-sqlite3-dev protoc-gen-go \
  protoc-gen-go-grpc protobuf-compiler gcc

# The console's browser tests drive Debian's Chromium; without a font its screenshots show no text.
CONSOLE_PACKAGES := chromium chromium-driver fonts-dejavu-core

## strace injects I/O errors in the storage-fault tests, and the Go participant's packages
## build it; Debian's packages, installed as root.
system:
	@command -v strace >/dev/null || { [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq strace >/dev/null) \
	  || echo "strace is missing (apt-get install strace): the I/O-error test will be skipped"; }
	@missing=$$(for p in $(GO_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'ok installed' || echo $$p; done); [ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) \
	  || echo "missing for the Go participant (apt-get install" $$missing"): its tests" \
	  "are skipped without go, and fail without the others"; }
	@missing=$$(for p in $(CONSOLE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'ok installed' || echo $$p; done); [ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing \
	      >/dev/null) \
	  || echo "missing for the console's browser tests (apt-get install" $$missing"): they" \
	  "are skipped"; }

$(VENV)/.installed: pyproject.toml stubs/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e stubs -e 'clients/python[postgresql]' -e '.[dev,uvloop,postgresql]'
	touch $@

scripts/node_modules/.installed: scripts/package.json scripts/package-lock.json
	cd scripts && npm ci --silent --no-audit --no-fund
	touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --silent --no-audit --no-fund
	touch $@

## The main job: onboard a corporate client, once succeeding and once compensating.
demo: install
	$(BIN)/python scripts/demo.py $(ARGS)

## The same demo, then the web console on it: everything keeps running until Ctrl-C.
console: install
	$(BIN)/python scripts/demo.py --console $(ARGS)

## Lint, type checks, layer contracts, the contract's lint, stubs drift, then every test:
## the Node.js SDK's with Node's own runner, then the Python suite (which runs Node processes)
## on two workers (a file's tests on one, in order, sharing its module fixtures), then the
## short torture runs alone, so that nothing else shares their cores.
test: install lint
	cd clients/node && npm test --silent
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore=tests/torture
	$(BIN)/python -m pytest -q tests/torture

lint: install check-stubs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(BUF) breaking --against $(CONTRACT_BASELINE)

## Fails when the committed stubs differ from a fresh regeneration.
check-stubs: install
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/generate_stubs.sh $$tmp/stubs >/dev/null \
	  && diff -r --exclude=__pycache__ $$tmp/stubs/saga stubs/saga \
	  && echo "stubs are up to date"; status=$$?; rm -rf $$tmp; exit $$status

stubs: install
	PYTHON=$(BIN)/python scripts/generate_stubs.sh

## Record the contract as released, after a release; `make lint` checks changes against it.
contract-baseline: install
	$(BUF) build -o $(CONTRACT_BASELINE)

## Measures four-step sagas through a coordinator against floors of the same calls, on loopback.
bench: install
	$(BIN)/saga bench $(ARGS)

## The long torture run: 2,000 SIGKILLs of the coordinator at crash points and random instants,
## participants killed, the network broken; then the offline checker's figures (all must be 0).
torture: install
	$(BIN)/python scripts/torture.py --kills 2000 --json-out torture-report.json

## The long torture run with replicas: 3 coordinators on a throw-away PostgreSQL database under
## 2 s leases, 600 SIGKILLs one replica at a time and pauses past the lease; the same figures.
torture-replicas: install
	$(BIN)/python scripts/torture.py --replicas 3 --postgresql --kills 600 --min-pauses 40 \
	  --json-out torture-replicas-report.json

## 10,000 sagas in flight against slow participants: peak memory, file descriptors, calls in flight.
load: install
	$(BIN)/python scripts/load.py --sagas 10000 --json-out load-report.json

## 100,000 sagas with memory flat, recovery of 10,000 in flight after SIGKILL, start-up on 1 GB.
scale: install
	$(BIN)/python scripts/scale.py $(ARGS)

## A store of 1,000,000 sagas: open, list with each filter, count by state, label and stuck-on
## lookups, a prune batch of 500 and a get, each the median of five runs, in milliseconds.
million: install
	$(BIN)/python scripts/million.py $(ARGS)

## The console's pages timed over HTTP on a store of 1,000,000 sagas and a saga of 10,000 events.
console-scale: install
	$(BIN)/python scripts/console_scale.py $(ARGS)

## The Node.js package test with a plain npm install: its install scripts run, so better-sqlite3
## compiles SQLite from source (minutes on 2 cores) instead of reusing the repository's build.
test-node-package-full: install
	SAGA_NODE_PACKAGE_FULL_INSTALL=1 $(BIN)/python -m pytest -q --timeout 900 \
	  tests/integration/test_node_package.py

clean:
	rm -rf $(VENV) scripts/node_modules clients/node/node_modules
