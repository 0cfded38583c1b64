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
# Every Python package a venv gets (runtime, dev tools, pip, the build backend) comes from this lock, pinned
# with hashes for Python 3.11-3.13 (uv's --universal markers); the project itself is then installed with
# --no-deps --no-build-isolation, so nothing unpinned or unhashed is fetched.  `make lock` regenerates it.
LOCK := requirements/ci.lock
LOCK_INPUTS := pyproject.toml requirements/build.in
# uv only regenerates the lock (`make lock`); installing from it needs nothing but pip.
UV_VERSION ?= 0.13.9
LOCK_TOOL := build/lock-tool

# `make install`: the files around the package (systemd units, the man page, bash and zsh completions) under
# $(DESTDIR)$(PREFIX); the package itself comes from pip/pipx (qwamos at $(PREFIX)/bin/qwamos).
PREFIX ?= /usr/local
DESTDIR ?=
UNITDIR ?= $(PREFIX)/lib/systemd/system

.PHONY: all deps venv pyc guest lint test demo demo-guest bench clean distclean lock dist install man completion

all: test

deps: $(DEPS_STAMP)
$(DEPS_STAMP): scripts/install-deps.sh
	bash scripts/install-deps.sh
	mkdir -p build && touch $@

venv: $(VENV_STAMP)
# The editable install builds the C extension qwamos._aead_runs in place (src/qwamos/_aead_runs.abi3.so); it is
# optional for pip users without a compiler, but not here: install-deps.sh installs gcc and the headers.
$(VENV_STAMP): pyproject.toml setup.py src/qwamos/_aead_runs.c $(LOCK) | $(DEPS_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c 'import qwamos._aead_runs' || { echo "make venv: the C extension qwamos._aead_runs did not build" \
		"(it needs gcc, libssl-dev and the Python headers: scripts/install-deps.sh)" >&2; exit 1; }
	touch $@

# Regenerate the lock after changing dependencies in pyproject.toml or requirements/build.in (then commit it).
# Add --upgrade (make lock LOCK_FLAGS=--upgrade) to move every pin to the newest release.
lock:
	test -x $(LOCK_TOOL)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOL) && $(LOCK_TOOL)/bin/pip install -q 'uv==$(UV_VERSION)'; }
	$(LOCK_TOOL)/bin/uv pip compile -q $(LOCK_INPUTS) --extra dev --generate-hashes --universal \
		--python-version 3.11 --custom-compile-command 'make lock' $(LOCK_FLAGS) -o $(LOCK)

# A wheel and an sdist in build/dist, built with the locked backend (no download).
dist: venv
	$(PY) -m build --no-isolation --sdist --wheel --outdir build/dist .

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
	$(PY) bench/rotate.py
	$(PY) bench/rotate_online.py
	$(PY) bench/backup.py
	$(PY) bench/boot.py --arch $(ARCH)

# Man page and shell completion, generated from the argument parser (qwamos.cli.main.full_parser) by
# argparse-manpage and shtab from the lock; `make man completion` (or `make install`) writes them to
# $(GEN_DIR)/man and $(GEN_DIR)/completion.  The file rule needs only an installed venv, not the deps chain.
GEN_DIR ?= build
MAN_PAGE := $(GEN_DIR)/man/qwamos.1
BASH_COMPLETION := $(GEN_DIR)/completion/qwamos.bash
ZSH_COMPLETION := $(GEN_DIR)/completion/_qwamos
CLI_SOURCES := $(wildcard src/qwamos/cli/*.py) src/qwamos/__init__.py

man: venv
	@$(MAKE) --no-print-directory $(MAN_PAGE)
completion: venv
	@$(MAKE) --no-print-directory $(BASH_COMPLETION) $(ZSH_COMPLETION)

$(MAN_PAGE): $(CLI_SOURCES)
	mkdir -p $(@D)
	$(VENV)/bin/argparse-manpage --module qwamos.cli.main --function full_parser --prog qwamos \
		--project-name qwamos --version "$$($(PY) -c 'import qwamos; print(qwamos.__version__)')" \
		--manual-title "QWAMOS manual" --description "encrypted VM storage and encrypted VMs" --output $@
$(BASH_COMPLETION): $(CLI_SOURCES)
	mkdir -p $(@D)
	$(VENV)/bin/shtab --error-unimportable --shell=bash --prog=qwamos qwamos.cli.main.full_parser --output $@
$(ZSH_COMPLETION): $(CLI_SOURCES)
	mkdir -p $(@D)
	$(VENV)/bin/shtab --error-unimportable --shell=zsh --prog=qwamos qwamos.cli.main.full_parser --output $@

# The shipped units name /usr/local/bin/qwamos; installed ones name $(PREFIX)/bin/qwamos.
install: $(MAN_PAGE) $(BASH_COMPLETION) $(ZSH_COMPLETION)
	install -D -m 0644 $(MAN_PAGE) $(DESTDIR)$(PREFIX)/share/man/man1/qwamos.1
	install -D -m 0644 $(BASH_COMPLETION) $(DESTDIR)$(PREFIX)/share/bash-completion/completions/qwamos
	install -D -m 0644 $(ZSH_COMPLETION) $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_qwamos
	install -d $(DESTDIR)$(UNITDIR)
	for unit in contrib/systemd/*.service contrib/systemd/*.timer; do \
		sed 's|/usr/local/bin/qwamos|$(PREFIX)/bin/qwamos|g' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit) && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$unit) || exit 1; \
	done

clean:
	rm -rf build/guest build/.deps.stamp

distclean: clean
	rm -rf build $(VENV) $(VENV)-3.*
