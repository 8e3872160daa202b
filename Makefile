# nspawn-mcp: `make run` sets everything up and serves MCP on stdio;
# `make test` sets everything up and runs every test. Both run as root.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NSPAWN_MCP := $(BIN)/nspawn-mcp
DEBIAN_PACKAGES := systemd-container debootstrap btrfs-progs util-linux dbus nftables iproute2 openssl
BENCH_PACKAGES := podman bubblewrap
REQUIRED_BINARIES := /usr/bin/systemd-nspawn /lib/systemd/systemd-machined /usr/sbin/debootstrap /sbin/mkfs.btrfs /usr/bin/unshare /usr/bin/dbus-daemon /usr/sbin/nft /usr/sbin/ip /usr/bin/openssl


.PHONY: run setup packages venv node test unit integration e2e conformance-expected lint format bench doctor stop clean

run:
	@$(MAKE) --no-print-directory -s setup >&2
	@exec $(NSPAWN_MCP) serve

setup: packages venv
	$(NSPAWN_MCP) setup

packages:
	@missing=; for f in $(REQUIRED_BINARIES); do [ -e $$f ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Node 22, the MCP Inspector and the conformance suite for the end-to-end tests, pinned in tests/e2e/node
# (node_tools.py, package.json, package-lock.json) and cached in ~/.cache/nspawn-mcp/node: a second run
# downloads nothing.
node: venv
	$(BIN)/python tests/e2e/node/node_tools.py

test: setup lint node
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

e2e: setup node
	$(BIN)/pytest tests/e2e

# Rewrites tests/e2e/conformance-expected.json from a run of the conformance suite; write the reason of
# any result it marks EXPLAIN (the e2e test refuses the file until then).
conformance-expected: setup node
	NSPAWN_MCP_CONFORMANCE_UPDATE=1 $(BIN)/pytest tests/e2e/test_conformance.py -q

lint: venv
	$(BIN)/ruff check server tests benchmarks
	$(BIN)/ruff format --check server tests benchmarks
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format server tests benchmarks
	$(BIN)/ruff check --fix server tests benchmarks

# Writes bench/results/<date>.json, .md and .png and the README's table (BENCH_ARGS=--quick to try it,
# --density 1000 for the full density run). Podman and bubblewrap are baselines: installed when missing,
# and recorded as not run when they cannot be.
bench: setup
	@command -v podman >/dev/null && command -v bwrap >/dev/null || { \
		echo "installing Debian packages: $(BENCH_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_PACKAGES) >/dev/null \
			|| echo "could not install $(BENCH_PACKAGES): those baselines will be recorded as not run"; }
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)
	$(BIN)/python benchmarks/frontend_overhead.py

doctor: venv
	$(NSPAWN_MCP) doctor

stop: venv
	$(NSPAWN_MCP) box stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
