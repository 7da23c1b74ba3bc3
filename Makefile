# The two commands of the README. Both work on a machine with only Python 3.11+ and pip:
# they create .venv, install OpenAcct into it, and start embedded servers when no
# OPENACCT_DATABASE_URL is set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-machine test-slurm simulate lint clean

demo: $(INSTALLED)
	$(BIN)/openacct demo

# Everything but the live Slurm tier; installs nothing outside the checkout, whoever runs it.
test: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slurm" $(PYTEST_ARGS)

# make test's part whose outcome can depend on the servers it runs on (the tests marked
# machine_servers by tests/conftest.py: the database's, RabbitMQ's, Slurm's and MUNGE's tools),
# on the PostgreSQL that OPENACCT_DATABASE_URL names; .ci/run's second pass, after make test on
# embedded servers has run all of them there.
test-machine: $(INSTALLED)
	@[ -n "$$OPENACCT_DATABASE_URL" ] || { echo "make test-machine: set OPENACCT_DATABASE_URL (make test runs every test on embedded servers)" >&2; exit 2; }
	$(BIN)/python -m pytest -m "machine_servers and not slurm" $(PYTEST_ARGS)

# The live Slurm tier (tests/slurm/): a single-node Slurm the tests start, its slurmdbd on the
# MariaDB at 127.0.0.1:3306. Installs Debian's Slurm packages first if they are missing (root,
# apt-get): the one target that installs system packages, and only when asked.
test-slurm: $(INSTALLED)
	$(BIN)/python -m tests.slurm.harness install
	$(BIN)/python -m pytest -m slurm tests/slurm $(PYTEST_ARGS)

# The ledger against its model (tests/test_ledger_simulator.py) for longer than the test run's
# minute: make simulate SECONDS=600. A failure prints the seed that replays it.
SECONDS ?= 600
simulate: $(INSTALLED)
	OPENACCT_SIM_SECONDS=$(SECONDS) $(BIN)/python -m pytest tests/test_ledger_simulator.py -s $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/python -m ruff check shared services openacct tests

$(INSTALLED): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("OpenAcct needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat mode: a plain path entry, so that the hooks start without an import finder
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

# .openacct (CI's data directory) goes: a local instance running on it stops first, its files with it.
clean:
	-[ ! -d .openacct ] || [ ! -x $(BIN)/openacct ] || OPENACCT_DATA_DIR=$(CURDIR)/.openacct $(BIN)/openacct local stop --delete-data
	rm -rf $(VENV) .openacct .pytest_cache
