# One command each on a fresh machine: `make demo` (`make demo-lm`), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PKG_DIRS := proto teacher_server student_client compression deploy

.PHONY: install demo demo-lm test lint typecheck unit proto bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,onnx]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lyceum demo

# The language-model demo: a tiny Llama on the stdlib's sources, CE vs top-k KD students.
demo-lm: $(STAMP)
	$(VENV)/bin/lyceum demo --lm

# mypy resolves modules by path; the `lyceum.*` names exist only through the
# package-dir mapping, so type-check a symlinked view of that mapping.
# The tests are checked too, as the package `tests` (their fixtures are `tests._support`).
build/typecheck/lyceum: Makefile
	rm -rf build/typecheck && mkdir -p build/typecheck/lyceum
	for d in $(PKG_DIRS); do ln -s $(CURDIR)/$$d build/typecheck/lyceum/$$d; done
	ln -s $(CURDIR)/proto/lyceum/v1 build/typecheck/lyceum/v1
	ln -s $(CURDIR)/tests build/typecheck/tests

typecheck: $(STAMP) build/typecheck/lyceum
	cd build/typecheck && $(CURDIR)/$(PY) -m mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p lyceum -p tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) typecheck

# Fast feedback: neither integration tests (real processes) nor slow ones (CI runs both).
unit: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow"

# pytest-xdist workers; every test passes alone and in any order, so any count works.
TEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=25  # the slowest tests in every log, CI's included

proto: $(STAMP)
	$(PY) -m lyceum.proto.generate

BENCHES ?= offline transport batching student pruning quantization

# Benchmarks print tables (not tests; minutes each). One: `make bench BENCHES=offline`.
bench: $(STAMP)
	for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
