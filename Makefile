# On a fresh machine: `make study` (the main job), `make bench` (counting alone) and `make test` (the tests).
# Each creates the virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# parallel compile jobs for the deformable-attention build; more cores, more jobs
MAX_JOBS ?= 2

.PHONY: install study bench test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# the official panoptic evaluator, a test oracle; --no-deps because it pins an old numpy
	$(PY) -m pip install --no-deps panopticapi-lite
	# the compiled multi-scale deformable attention (the `deform` extra; a test oracle for the pure PyTorch form):
	# a source build against the torch installed above, hence --no-build-isolation (about 85 s on 2 cores)
	$(PY) -m pip install setuptools wheel
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-deps --no-build-isolation torch-ms-deform-attn
	touch $(STAMP)

# The main job, the study in miniature (scripts/main_study.py): the real-size parameter and GFLOPs table beside
# the paper's, Table 1's six rows and Table 7's mask settings trained on the built-in synthetic set as submitit
# local jobs (experiments/main_study.yaml), evaluated and timed, then every table and figure in
# runs/main/report/index.md. Run again, it finds every step done. Flags go through STUDY_ARGS, e.g.
#   make study STUDY_ARGS="--set train.max_steps=2000 --set model.size=S --cluster slurm"
STUDY_ARGS ?=
study: install
	$(PY) scripts/main_study.py $(STUDY_ARGS)

# Counting alone: parameters and GFLOPs of EoMT at every size (docs/paper.md sections 3 and 8), then FPS at S.
bench: install
	$(VENV)/bin/study bench experiments/bench_eomt.yaml --no-fps --json runs/bench/eomt_640.json
	$(VENV)/bin/study bench experiments/bench_eomt_1280.yaml --no-fps --json runs/bench/eomt_1280.json
	$(VENV)/bin/study bench experiments/bench_eomt.yaml --sizes S --json runs/bench/eomt_fps_S.json

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
