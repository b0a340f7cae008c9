# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
# CPU build that is on disk here; a GPU host overrides it, e.g. make TORCH_SPEC="torch==2.5.1" demo
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pynetdicom installs its example apps as console scripts named like dcmtk's tools (echoscu, storescu,
# ...) but with other options; in an activated venv they would shadow dcmtk's, and the dcmtk commands
# of README.md and deploy/PACS_INTEGRATION.md would fail. They are removed from the venv (still there
# as `python -m pynetdicom echoscu ...`).
PYNETDICOM_APPS := echoscp echoscu findscu getscu movescu qrscp storescp storescu

.PHONY: install demo test bench faults lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,postgres]"
	for app in $(PYNETDICOM_APPS); do if grep -qs pynetdicom $(VENV)/bin/$$app; then rm -f $(VENV)/bin/$$app; fi; done
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pe-agent demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (minutes; results table in docs/BENCHMARKS.md). BENCH_ARGS passes options to benchmarks.run.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Long fault-injection tests (kill -9 at random points, ...) on top of those in make test.
faults: $(STAMP)
	PE_RUN_FAULTS=1 $(PY) -m pytest tests/faults tests/security $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
