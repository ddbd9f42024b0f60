# One-command entry points; everything installs into .venv/ in the repository root.
#   make demo   set up, then run the demo (data prep + a short training run) on the embedded corpus
#   make test   set up, then run the test suite
#   make bench  set up, then run the benchmarks in bench/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the stamp changes whenever the lock or setup.py does, so `make` reinstalls exactly then
STAMP := $(VENV)/.installed-$(shell cat requirements/lock.txt setup.py | sha1sum | cut -c1-12)

.PHONY: setup demo test bench
setup: $(STAMP)

$(STAMP): requirements/lock.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "pip==24.3.1"
	$(PY) -m pip install --quiet --no-deps -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(PY) -m lemon_composer.demo

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/data_prep_throughput.py
	$(PY) bench/fusion_forward.py
	$(PY) bench/fusion_step.py
	cd bench && ../$(VENV)/bin/composer -n 2 sharded_fusion.py
