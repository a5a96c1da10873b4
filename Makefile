# isobox developer entry points. The one assumption about the machine: `make` exists
# (Debian 12, root); `make setup` installs everything else (scripts/setup.sh).
#
#   make setup      Debian packages, .venv with isobox[dev], the default busybox image
#   make demo       setup, then scripts/demo.sh
#   make test       setup without the image bootstrap, then pytest (PYTEST_ARGS=...)
#   make lint       ruff check src tests bench
#   make typecheck  mypy --strict on src/isobox (pyproject) and on bench/
#   make bench      setup --peers (runc, crun, podman, docker, ...), then python -m bench
#                   (BENCH_ARGS=image_import picks benchmarks; BENCH_ROUNDS=N rounds)
#   make clean      build artefacts, caches, the venv's install stamp (keeps bench/results)

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SETUP := bash scripts/setup.sh
PYTEST_ARGS ?=
BENCH_ARGS ?=

# setup steps take apt and pip locks: never run two of them at once under `make -j`.
.NOTPARALLEL:
.PHONY: help setup deps demo test lint typecheck bench clean

help:
	@sed -n '4,11p' Makefile | sed 's/^# \{0,1\}//'

setup:
	$(SETUP)

# setup without the image bootstrap and the utility-VM build: tests use their own
# ISOBOX_ROOT and bootstrap there, and build their shared utility-VM assets in
# $ISOBOX_UVM_DIR (tests/conftest.py) on the first vm test.
deps:
	ISOBOX_SETUP_NO_BOOTSTRAP=1 ISOBOX_SETUP_NO_UVM=1 $(SETUP)

demo: setup
	bash scripts/demo.sh

# pytest exits 5 when it collected no tests: that is a failure here, never a green run.
test: deps
	@rc=0; $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	    echo "make test: FAILED: pytest collected no tests (exit 5); check testpaths and PYTEST_ARGS" >&2; \
	    exit 1; \
	fi; \
	exit $$rc

lint: deps
	$(VENV)/bin/ruff check src tests bench

# Both runs happen even if the first fails; the target fails if either did.
typecheck: deps
	@rc=0; \
	echo "$(VENV)/bin/mypy"; $(VENV)/bin/mypy || rc=1; \
	echo "$(VENV)/bin/mypy bench"; $(VENV)/bin/mypy bench || rc=1; \
	exit $$rc

bench:
	ISOBOX_SETUP_NO_BOOTSTRAP=1 $(SETUP) --peers
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -f $(VENV)/.isobox-installed
	rm -rf build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache bench/.cache
	find src tests bench -name __pycache__ -type d -prune -exec rm -rf {} +
