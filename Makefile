# llmp: every entry point a user, CI or a benchmark needs. `make help` lists them.
SHELL := /bin/bash
PYTHON_SYSTEM ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LLMP := $(VENV)/bin/llmp
INSTALLED := $(VENV)/.installed
BENCHES := dataset dataset-scale training registry inference gateway finetune embeddings chat eval contamination

.PHONY: help install protos protos-check lint test test-unit test-integration test-e2e test-reliability \
        up down status demo bench $(addprefix bench-,$(BENCHES)) clean

# Every target with a `## ` comment, then one line per benchmark (their rule names them through $(BENCHES)).
help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 22
	@printf '%-22s%s\n' $(foreach b,$(BENCHES),bench-$(b) "the $(b) benchmark (bench/$(b).py)")

$(PY):
	$(PYTHON_SYSTEM) -m venv $(VENV)

# Written once the install succeeded.
$(INSTALLED): requirements.lock requirements-transformers4.lock pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade "pip==26.3"
	$(PIP) install --quiet --no-deps -r requirements.lock
	$(PIP) install --quiet --no-deps --upgrade --target $(VENV)/transformers4 -r requirements-transformers4.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(INSTALLED) ## install llmp and its pinned dependencies into .venv (requirements.lock); the targets that need it do it first

# Each target that runs llmp's Python installs it first (once: the stamp is newer than the lock and pyproject.toml
# until they change), so a fresh clone needs only `make demo` or `make test`.
protos protos-check lint test test-unit test-integration test-e2e test-reliability up down status demo \
        $(addprefix bench-,$(BENCHES)): $(INSTALLED)

protos: ## regenerate gen/ from protos/
	$(PY) scripts/gen_protos.py

protos-check: ## fail when gen/ is out of date with protos/
	$(PY) scripts/gen_protos.py --check

lint: ## ruff over the hand-written code
	$(VENV)/bin/ruff check services gateway cli tests bench scripts

test: protos-check lint ## every test: unit, integration (real PostgreSQL, S3, broker, Triton) and end to end
	$(PY) -m pytest tests -q

# Unit tests need no server. Where `unshare` can make a network namespace (as root, or through a user namespace)
# they run in a fresh one with only loopback up, so a test leaning on a server of this machine fails here too;
# elsewhere the guard in tests/unit/conftest.py alone keeps them off servers.
UNSHARE = $(shell command -v ip >/dev/null && { unshare -n true 2>/dev/null && echo "unshare -n" || \
	{ unshare -rn true 2>/dev/null && echo "unshare -rn"; }; })
NO_NETWORK = $(if $(UNSHARE),$(UNSHARE) sh -c 'ip link set lo up && exec "$$0" "$$@"')

test-unit: ## unit tests only
	$(NO_NETWORK) $(PY) -m pytest tests/unit -q

test-integration: ## integration tests against real servers
	$(PY) -m pytest tests/integration -q

test-e2e: ## the whole stack through the gateway
	$(PY) -m pytest tests/e2e -q

test-reliability: ## faults, load and bad input
	$(PY) -m pytest tests/reliability -q

up: ## start the local stack (PostgreSQL, S3, broker, Triton, services, worker, gateway)
	$(LLMP) up

down: ## stop what `make up` started
	$(LLMP) down

status: ## show the local stack
	$(LLMP) status

demo: up ## the main job end to end: corpus -> dataset -> training -> registry -> Triton -> completion
	$(PY) -m cli.demo

clean: down ## remove local state
	rm -rf .llmp

bench: $(addprefix bench-,$(BENCHES)) ## every benchmark

# A static pattern rule: make skips implicit-rule search for .PHONY targets, so `bench-%:` alone never ran.
# Each first waits (at most 3 minutes) for the load the previous one left to settle: `make bench` runs them
# back to back, and a benchmark started before the 1-minute average falls refuses to report.
$(addprefix bench-,$(BENCHES)): bench-%:
	$(PY) -m bench.harness --settle
	$(PY) -m bench.$(subst -,_,$*)
