# The two commands are `make demo` and `make test`; each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IOTESTS_JOBS ?= $(shell nproc)
export TESTBED_CACHE ?= $(HOME)/.cache/testbed

.PHONY: help deps venv test demo qemu images guest bench iotests lint typecheck clean

help:
	@echo "make demo   - set everything up and run the comparison report (the main job)"
	@echo "make test   - set everything up and run the test suite"
	@echo "make qemu   - build QEMU 7.2 and 10.0, patched and stock (QEMU_VERSIONS=10.0: one; cached)"
	@echo "make images - generate the image corpus under build/images"
	@echo "make guest  - build the guest kernel + initramfs (cached)"
	@echo "make bench  - fd-passing benchmark (table, JSON, plots under build/bench)"
	@echo "make iotests - QEMU's own iotests unhooked vs hooked (report under build/iotests)"
	@echo "make lint   - ruff check, ruff format --check, mypy strict"

deps:
	@scripts/deps.sh all

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

venv: deps $(STAMP)

qemu: deps
	@QEMU_VERSIONS="$(QEMU_VERSIONS)" scripts/build-qemu.sh

images: deps
	@$(PYTHON) images/generate.py --out build/images

guest: deps
	@scripts/build-guest.sh

lint: venv
	$(VENV)/bin/ruff check testbed tests images
	$(VENV)/bin/ruff format --check testbed tests images
	$(VENV)/bin/mypy

typecheck: lint

test: venv qemu images guest lint
	$(PY) -m pytest -q

demo: venv qemu images
	$(VENV)/bin/testbed compare --qemu-version "$(QEMU_VERSIONS)" --json build/report/compare.json --report build/report

bench: venv qemu
	$(VENV)/bin/testbed bench --json build/bench/bench.json --plot build/bench

iotests: venv qemu
	$(VENV)/bin/testbed iotests --jobs $(IOTESTS_JOBS) --json build/iotests/iotests.json --report build/iotests/report

clean:
	rm -rf build $(VENV)
