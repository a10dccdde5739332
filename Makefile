# The two commands a newcomer needs: `make run` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser run test bench lint postgres clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,semantic,elasticsearch]'
	touch $(STAMP)

install: $(STAMP) browser

# The dashboard's end-to-end test drives Debian's headless chromium: install it where missing.
browser:
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# Seed the demo workload (idempotent), then start everything on the embedded SQLite default.
run: install
	$(VENV)/bin/memwarden demo
	$(VENV)/bin/memwarden up

# PostgreSQL is part of the test suite: start the local cluster if it is installed and down.
postgres:
	@if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1; then \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true; \
		for i in 1 2 3 4 5 6 7 8 9 10; do pg_isready -q -h 127.0.0.1 && break; sleep 1; done; \
	fi

test: install postgres
	$(PY) -m pytest

bench: install postgres
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check eventstore projections governance dashboard tests bench

clean:
	rm -rf $(VENV) data .pytest_cache
