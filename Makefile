# Two commands on a fresh machine: `make bench` (the main job) and `make test` (the tests).
# Both create the virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install bench test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# the official panoptic evaluator, a test oracle; --no-deps because it pins an old numpy
	$(PY) -m pip install --no-deps panopticapi-lite
	touch $(STAMP)

# The main job: parameters, GFLOPs and FPS of EoMT at every size (paper.md sections 3 and 8).
bench: install
	$(VENV)/bin/study bench --variants eomt,eomt_masked --sizes S,B,L,g --img-size 640 --json bench_eomt.json

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
