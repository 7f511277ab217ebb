# Every target creates/reuses .venv in the repo and installs what it needs from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# This machine keeps torch/torchvision wheels on disk; elsewhere pip fetches them from PyPI.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST := $(PY) -m pytest
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-slow lint format bench table clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC) || $(PIP) install -q torch torchvision
	$(PIP) install -q -e ".[dev,timm,hf,report,webdataset,export]"
	# facenet-pytorch pins torch<2.3: only its code is installed, for the FaceNet compatibility test.
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	# torchdistill: peer-agreement tests and benchmarks only (its own pins would fight ours).
	$(PIP) install -q --no-deps torchdistill==1.1.5
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m distill demo

test: $(STAMP)
	bash .ci/ensure_chromium.sh
	$(PYTEST) -q

test-slow: $(STAMP)
	bash .ci/ensure_chromium.sh
	$(PYTEST) -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check distill teachers recipes tests benchmarks
	$(PY) -m ruff format --check distill teachers recipes tests benchmarks
	$(PY) -m mypy distill teachers recipes

format: $(STAMP)
	$(PY) -m ruff format distill teachers recipes tests benchmarks
	$(PY) -m ruff check --fix distill teachers recipes tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/digits_kd.py
	$(PY) benchmarks/methods.py
	$(PY) benchmarks/throughput.py --device cpu
	$(PY) benchmarks/input_pipeline.py --device cpu --images 512 --workers 2 --batch-size 64
	$(PY) benchmarks/cache_fidelity.py --seeds 1
	$(PY) benchmarks/latency.py

table: $(STAMP)
	$(PY) -m distill table

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs demo_out
