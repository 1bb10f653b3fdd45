# qmtl: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_HOME := $(CURDIR)/.qmtl-demo
QMTL   := QMTL_HOME=$(DEMO_HOME) QMTL_WORLDS_DIR=$(CURDIR)/worlds $(BIN)/qmtl
PG_BIN := /usr/lib/postgresql/15/bin

.PHONY: demo test install dev postgres bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.install.stamp: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.dev.stamp: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.install.stamp

install: $(VENV)/.install.stamp

dev: $(VENV)/.dev.stamp

# The suite runs every store test on PostgreSQL too: install the server binaries when missing.
postgres:
	@if command -v initdb >/dev/null 2>&1 || [ -x $(PG_BIN)/initdb ]; then :; \
	else echo "installing PostgreSQL server binaries (apt-get install -y postgresql)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; fi

demo: install
	@echo "== validating the bundled worlds"
	$(QMTL) world validate --all
	@echo "== the worlds, recorded in the embedded store at $(DEMO_HOME)/qmtl.db"
	$(QMTL) world list
	@for w in $$(ls worlds/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//'); do \
	  echo "== world $$w"; $(QMTL) world show $$w || exit $$?; done
	@echo "== the audit ledger"
	$(QMTL) audit log --limit 10
	$(QMTL) audit verify

test: dev postgres
	PATH="$$PATH:$(PG_BIN)" $(BIN)/python -m pytest -n auto -W error -q

bench: dev
	$(BIN)/python benchmarks/cli_startup.py

clean:
	rm -rf $(DEMO_HOME) .pytest_cache .hypothesis
