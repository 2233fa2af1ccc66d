# Everything a user needs: `make demo` (the main job), `make test`, `make setup`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default; on a GPU machine: make setup TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)" numpy setuptools wheel
	# DeepSpeed's setup.py imports torch: build it against the torch installed above.
	$(PIP) install -q --disable-pip-version-check --no-build-isolation "deepspeed>=0.14"
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow tests

demo: setup
	$(VENV)/bin/ldm demo --output demo_out

bench: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/extraction.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/training.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/ivvae_cache.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/varlen.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/tiling.py

# On a GPU machine (make setup TORCH_SPEC="torch"): every full-size autoencoder, then
# ldm extract -> ldm train (DeepSpeed bf16) -> ldm sample, one line per part.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf demo_out runs
