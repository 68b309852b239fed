# The README's two commands: `make demo` and `make test`. Each creates the venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo quickstart test test-fast bench gpu-check lint clean up down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

## demo: the synthetic data, a local Ray head + MLflow server, `ray job submit` of a 2-worker
## training of the tiny SSD, the model registered (no download, no GPU; `make down` stops them)
demo: venv
	$(PY) pipelines/demo.py

## quickstart: the same training in one process, without Ray or MLflow
quickstart: venv
	$(PY) pipelines/quickstart.py

## test: the whole test suite (CPU; about 24 minutes on 2 cores, most of it real Ray/MLflow runs)
test: venv
	$(PY) -m pytest -q

## test-fast: unit tests only, skipping end-to-end runs
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

## bench: side-by-side benchmarks against torchvision, tables printed (run_all.py --write-docs: into docs/BENCHMARKS.md)
bench: venv
	$(PY) benchmarks/run_all.py

## gpu-check: one-GPU check (issue 17), <= 8 min: ours vs torchvision throughput and MFU, the
## real loader end to end, a learning check, Ray with one GPU worker, torch.compile; JSON and
## markdown in $OUT (default benchmarks/results/gpu_check/). GPU_CHECK_DRY=1: tiny, on the CPU
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

## up / down: a local Ray head and MLflow server on 127.0.0.1 (infra/local/start.sh, stop.sh)
up: venv
	infra/local/start.sh

down:
	infra/local/stop.sh

lint: venv
	$(VENV)/bin/ruff check ssd pipelines tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache data
