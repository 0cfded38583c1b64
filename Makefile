# QWAMOS storage: set-up, guest, lint, tests, demo.  On a fresh Debian 12 machine, as root or with sudo:
#   make demo    installs what is missing, then boots a guest end to end (ARCH=aarch64 by default)
#   make test    installs what is missing, then runs ruff and the whole test suite
# Each step is skipped when already done (stamp files; the guest builder checks its own outputs).

ARCH ?= aarch64
# `make guest` builds both guests unless ARCH is given on the command line or in the environment.
GUEST_ARCHES := $(if $(filter command line environment,$(origin ARCH)),$(ARCH),x86_64 aarch64)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LINT_PATHS := src tests bench tools hypervisor/scripts

DEPS_STAMP := build/.deps.stamp
VENV_STAMP := $(VENV)/.installed.stamp

.PHONY: all deps venv pyc guest lint test demo demo-guest bench clean distclean

all: test

deps: $(DEPS_STAMP)
$(DEPS_STAMP): scripts/install-deps.sh
	bash scripts/install-deps.sh
	mkdir -p build && touch $@

venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml | $(DEPS_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

guest: deps
	for arch in $(GUEST_ARCHES); do $(PYTHON) tools/build_guest.py $$arch build/guest/$$arch || exit 1; done

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# Bytecode for the package, so that the per-VM processes (supervisor, block export) start without compiling
# the sources each time even where PYTHONDONTWRITEBYTECODE is set; quick when nothing changed.
pyc: venv
	$(PY) -m compileall -q src

# The whole suite under the default interpreter, then the data-path tests under every other Python that
# requires-python admits (3.12, 3.13: scripts/test-other-pythons.sh, each in its own .venv-3.X).
test: deps venv guest lint pyc
	$(VENV)/bin/pytest -q
	bash scripts/test-other-pythons.sh

demo: deps venv pyc
	$(MAKE) guest ARCH=$(ARCH)
	$(PY) tools/demo.py --arch $(ARCH)

# The tiny guest on a raw disk: write a marker, boot again, read it back.
demo-guest: venv
	$(PY) tests/guestlib.py roundtrip $(ARCH)

bench: deps venv pyc
	$(MAKE) guest ARCH=$(ARCH)
	$(PY) bench/volume_api.py
	$(PY) bench/nbd.py
	$(PY) bench/migrate.py
	$(PY) bench/boot.py --arch $(ARCH)

clean:
	rm -rf build/guest build/.deps.stamp

distclean: clean
	rm -rf build $(VENV) $(VENV)-3.*
