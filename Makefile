# The two commands of the README:
#   make run   set up .venv and run the default pipeline (embedded `digits` suite, CPU, minutes)
#   make test  set up .venv, start the local SLURM test cluster, install headless chromium, run the tests
#              (two workers, a test file each at a time: the SLURM tests mostly wait for the scheduler)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= all

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml --report results/digits/report.html
	@echo "Results: results/digits/ (scores.csv, tables/, figures/, report.html)"

test: $(STAMP)
	bash tests/slurm/cluster.sh up || echo "!!! local SLURM cluster could not be started: the SLURM integration test will say why it skips"
	bash tests/browser/setup.sh >/dev/null || echo "!!! headless chromium could not be installed: the browser test will fail and say why"
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH SUBMERGE_REQUIRE_BROWSER=1 $(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint --configfile config/config.yaml
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results logs benchmarks .snakemake
