# Every target creates .venv itself when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
EXTRAS ?= dev,bench
ROOT ?= data/demo
ABSROOT := $(abspath $(ROOT))
# as many workers as cores, idle ones stealing tests: the daemon and service tests mostly wait, so they
# overlap with the CPU-bound ones
PYTEST_ARGS ?= -n auto --dist worksteal

.PHONY: venv demo test ui bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m curation_assets.demo --root $(ROOT)

test: venv
	@# compile the numba kernels once (numba caches them on disk) before parallel workers would each do it
	$(BIN)/python -c "from curation_assets.core.pixel_verify import compile_kernels as c; print(f'kernels ready in {c():.1f} s')"
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

ui: venv
	DAGSTER_HOME=$(ABSROOT)/dagster_home CURATION_ROOT=$(ABSROOT) CURATION_SHARDS=$(ABSROOT)/shards \
	CURATION_CONFIG=$(if $(wildcard $(ABSROOT)/demo_config.yaml),$(ABSROOT)/demo_config.yaml,) \
	$(BIN)/dagster dev -w workspace.yaml

bench: venv
	mkdir -p bench/results
	set -e; for script in bench/bench_*.py; do \
	  name=$$(basename $$script .py | sed 's/^bench_//'); \
	  echo "== $$script"; $(BIN)/python $$script --out bench/results/$$name.json; \
	done
	$(BIN)/python bench/summarize.py bench/results

clean:
	rm -rf $(VENV) data
