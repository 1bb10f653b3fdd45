# qmtl: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_HOME := $(CURDIR)/.qmtl-demo
# The demo runs on a copy of the bundled worlds (see the demo target): you are demo-momentum's
# trusted producer there, and its paper window is measured in seconds so the story fits in a minute.
DEMO_WORLDS := $(DEMO_HOME)/worlds
QMTL   := QMTL_HOME=$(DEMO_HOME) QMTL_WORLDS_DIR=$(DEMO_WORLDS) $(BIN)/qmtl
# Paper returns a producer observed since the strategy entered paper: one per second, ending now.
PAPER_RETURNS := $(BIN)/python examples/paper_snapshot.py --world demo-momentum --strategy sma_10_30 --spacing-seconds 1
PG_BIN := /usr/lib/postgresql/15/bin
# Steps whose non-zero exit is part of the story (blocked, waiting, fail-closed) say so and go on.
SAYEXIT := || echo "   (exit $$?: see Exit codes in README.md)"
TOKEN_OF := $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["token"])'
FIRST_REQUEST := $(QMTL) promote --list --json | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["requests"][0]["request_id"])'

.PHONY: demo test install dev postgres browser promtool bench docs clean

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

# The alert rules are checked by promtool (Debian's prometheus package) when it can be installed.
promtool:
	@if command -v promtool >/dev/null 2>&1; then :; \
	else echo "installing promtool for the alert-rule test (apt-get install -y prometheus)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	  || echo "promtool could not be installed: the alert-rule test will be skipped with this reason"; fi

# The suite runs every store test on PostgreSQL too: install the server binaries when missing.
postgres:
	@if command -v initdb >/dev/null 2>&1 || [ -x $(PG_BIN)/initdb ]; then :; \
	else echo "installing PostgreSQL server binaries (apt-get install -y postgresql)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; fi

# The report test opens a report in headless Chromium: install it (and its driver) when missing.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	else echo "installing headless Chromium for the report test (apt-get install -y chromium chromium-driver)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; fi

# The demo starts from an empty store each time, so it always tells the same story.
demo: install
	@rm -rf $(DEMO_HOME)
	@mkdir -p $(DEMO_HOME) && cp -r worlds $(DEMO_WORLDS)
	@who=$$($(BIN)/python -c 'import getpass; print(getpass.getuser())'); \
	  sed -i -e "s/^  paper: {window: 30d, min_observations: 20}/  paper: {window: 30s, min_observations: 20}/" \
	    -e "s/^risk:$$/risk:\n  producers: [$$who]      # the demo's trusted producer: you (production: a producer token)/" \
	    $(DEMO_WORLDS)/demo-momentum.yaml
	@echo "== 1. validate the bundled worlds (recorded as policy versions in $(DEMO_HOME)/qmtl.db)"
	$(QMTL) world validate --all --record
	$(QMTL) world list
	@echo "== 2. gate and select eight GOOG strategies offline (nothing recorded)"
	$(QMTL) world evaluate demo-momentum --returns worlds/data/demo-returns.csv $(SAYEXIT)
	@echo "== 3. record their backtest runs (vectorised cohort path)"
	$(QMTL) world evaluate demo-momentum --record --returns worlds/data/demo-returns.csv > /dev/null $(SAYEXIT)
	@echo "== 4. the campaign loop's plan (changes nothing), then the loop acting on it"
	$(QMTL) world campaign-loop --world demo-momentum --once $(SAYEXIT)
	$(QMTL) world campaign-loop --world demo-momentum --once --execute $(SAYEXIT)
	@echo "== 5. paper evidence: only a trusted producer's returns observed after entering paper count"
	@echo "   (returns typed into a request are recorded as unverified and never count; see README Going live)"
	$(QMTL) world evaluate demo-momentum --strategy sma_10_30 --stage paper --returns worlds/data/demo-returns.csv $(SAYEXIT)
	@echo "   the producer (you, in this demo's copy of the world) posts a return a second as they are observed"
	@sleep 12
	$(PAPER_RETURNS) --days 12 | $(QMTL) risk put -
	$(QMTL) world campaign-loop --world demo-momentum --once --execute $(SAYEXIT)
	$(QMTL) world campaign demo-momentum --strategy sma_10_30
	@sleep 24
	$(PAPER_RETURNS) --days 35 | $(QMTL) risk put -
	$(QMTL) world campaign-loop --world demo-momentum --once --execute $(SAYEXIT)
	$(QMTL) world campaign demo-momentum --strategy sma_10_30
	@echo "== 6. governance: the loop opened a live request; the approvers read its report, then two sign it"
	$(QMTL) world report demo-momentum --strategy sma_10_30
	$(QMTL) promote --list
	@echo "   local mode acts as your OS account, so two people approve the way they would in production:"
	@echo "   each with their own token, against a qmtl serve started here on a free localhost port"
	$(QMTL) token create --actor alice --role approver --json | $(TOKEN_OF) > $(DEMO_HOME)/alice.token
	$(QMTL) token create --actor bob --role approver --json | $(TOKEN_OF) > $(DEMO_HOME)/bob.token
	@port=$$($(BIN)/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	  $(QMTL) serve --host 127.0.0.1 --port $$port & pid=$$!; trap "kill $$pid" EXIT; \
	  for i in $$(seq 100); do $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$$port/healthz')" 2>/dev/null && break; sleep 0.2; done; \
	  request=$$($(FIRST_REQUEST)); \
	  echo "\$$ QMTL_TOKEN=\$$(cat alice.token) qmtl --server http://127.0.0.1:$$port approve $$request --reason \"paper window clean\""; \
	  QMTL_TOKEN=$$(cat $(DEMO_HOME)/alice.token) $(QMTL) --server http://127.0.0.1:$$port approve $$request --reason "paper window clean" $(SAYEXIT); \
	  echo "\$$ QMTL_TOKEN=\$$(cat bob.token) qmtl --server http://127.0.0.1:$$port approve $$request --reason \"agreed\"   (the last approval: without --allow-live it only says what it would do)"; \
	  QMTL_TOKEN=$$(cat $(DEMO_HOME)/bob.token) $(QMTL) --server http://127.0.0.1:$$port approve $$request --reason "agreed" $(SAYEXIT); \
	  echo "\$$ QMTL_TOKEN=\$$(cat bob.token) qmtl --server http://127.0.0.1:$$port approve $$request --reason \"agreed\" --allow-live"; \
	  QMTL_TOKEN=$$(cat $(DEMO_HOME)/bob.token) $(QMTL) --server http://127.0.0.1:$$port approve $$request --reason "agreed" --allow-live $(SAYEXIT)
	$(QMTL) world decision demo-momentum --strategy sma_10_30
	$(QMTL) world history demo-momentum
	@echo "== live returns arrive; the loop records the live run (monitoring)"
	@sleep 11
	$(PAPER_RETURNS) --days 10 --stage live | $(QMTL) risk put -
	$(QMTL) world campaign-loop --world demo-momentum --once --execute $(SAYEXIT)
	@echo "== 7. submit strategy files; paper-trade one on bars that arrive after its backtest"
	$(QMTL) submit examples/strategies/sma_crossover.py --world demo-momentum $(SAYEXIT)
	@mkdir -p $(DEMO_HOME)
	head -n 1963 worlds/data/GOOG.csv > $(DEMO_HOME)/history.csv
	(head -n 1 worlds/data/GOOG.csv; tail -n +1964 worlds/data/GOOG.csv) > $(DEMO_HOME)/new-bars.csv
	$(QMTL) submit examples/strategies/sma_crossover.py --world demo-momentum --param allow_short=false --data $(DEMO_HOME)/history.csv $(SAYEXIT)
	$(QMTL) world campaign-loop --world demo-momentum --once --execute $(SAYEXIT)
	$(QMTL) run examples/strategies/sma_crossover.py --world demo-momentum --param allow_short=false --data $(DEMO_HOME)/new-bars.csv $(SAYEXIT)
	$(QMTL) world campaign demo-momentum
	@echo "== 7b. shadow: the same new bars as a mirror of the live inputs; every order is blocked and counted"
	$(QMTL) submit examples/strategies/sma_crossover.py --world demo-momentum --param allow_short=false --data $(DEMO_HOME)/history.csv --domain shadow $(SAYEXIT)
	$(QMTL) run examples/strategies/sma_crossover.py --world demo-momentum --param allow_short=false --data $(DEMO_HOME)/new-bars.csv --domain shadow $(SAYEXIT)
	$(QMTL) world runs demo-momentum --stage shadow
	$(QMTL) submit examples/strategies/mean_reversion.py --world research-sandbox --param allow_short=false --domain shadow $(SAYEXIT)
	@echo "== 8. runs with equity sparklines, and the world's report"
	$(QMTL) world runs demo-momentum --strategy sma_10_30
	$(QMTL) world report demo-momentum --out $(DEMO_HOME)/report.html
	@echo "== 9. the audit ledger"
	$(QMTL) audit log --limit 8
	$(QMTL) audit verify

test: dev postgres browser promtool
	@echo "== the whole suite on SQLite and PostgreSQL (about 24 minutes on 2 idle cores; progress in %, slowest tests at the end)"
	PATH="$$PATH:$(PG_BIN)" $(BIN)/python -m pytest -n auto -W error --durations=10

# Each benchmark prints its numbers against a reference measured in the same run.
bench: dev postgres
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/metrics_cohort.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/campaign_tick.py
	PATH="$$PATH:$(PG_BIN)" $(BIN)/python benchmarks/campaign_execute.py
	$(BIN)/python benchmarks/backtest.py
	$(BIN)/python benchmarks/report.py
	PATH="$$PATH:$(PG_BIN)" $(BIN)/python benchmarks/serve_load.py

# docs/cli.md is generated from every command's --help (tests/test_docs.py keeps it current).
docs: dev
	$(BIN)/python docs/gen_cli_docs.py

clean:
	rm -rf $(DEMO_HOME) .pytest_cache .hypothesis
