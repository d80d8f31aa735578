# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
POLICY ?= policies/mnist-pgd.yaml
OUT    ?= runs/demo

.PHONY: demo test lint typecheck bench clean venv docs gpu-check

venv: $(STAMP)

# torch/torchvision are pinned for reproducibility (pyproject states ranges for users);
# the lock file pins the rest to the versions the suite was last run with.
$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements-lock.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c requirements-lock.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/harden run $(POLICY) --out $(OUT) --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check harden tests examples benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 -m "not serial"   # two workers (CI has 2 cores); tests pin torch to 1 thread
	$(PY) -m pytest -q -m serial              # heavy or timed subprocesses, alone

lint: $(STAMP)
	$(VENV)/bin/ruff check harden tests examples benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

docs: $(STAMP)
	$(PY) -m harden.docs

# `make bench` runs every benchmark at SIZE (default small: a few minutes each on 2 cores) on
# DEVICE (cpu or cuda), then assembles benchmarks/RESULTS.md with this run's sections first.
# Benchmarks never run in `make test`.
SIZE    ?= small
DEVICE  ?= cpu
BENCHES := attacks iwd_cost objectives bn_ablation training certify inference demo
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c requirements-lock.txt -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@set -e; run=$$(date -u +%Y%m%dT%H%M%S); export HARDEN_BENCH_RUN=$$run; \
	for b in $(BENCHES); do \
		echo "== benchmarks/$$b.py --size $(SIZE) --device $(DEVICE)"; start=$$(date +%s); \
		$(PY) benchmarks/$$b.py --size $(SIZE) --device $(DEVICE); \
		echo "== $$b: $$(( $$(date +%s) - start )) s"; \
	done; \
	$(PY) benchmarks/report.py --run $$run --size $(SIZE) --device $(DEVICE) --expect $(BENCHES)

# `make gpu-check` proves the CUDA paths on one GPU in under 8 minutes (benchmarks/gpu_check.py:
# environment and CUDA library agreement, pytest -m gpu, harden run of policies/mnist-gpu.yaml
# with ONNX parity on CUDA, make bench's GPU sections, NCCL DDP). `make gpu-check DEVICE=cpu` is
# its dry run (CI runs it through tests/test_gpu_check.py). GPU_PY=python3 uses that interpreter
# (a machine whose python already has torch and harden's dependencies) instead of .venv.
GPU_PY  ?= $(PY)
GPU_OUT ?= runs/gpu-check
GPU_DEVICE := $(if $(filter command line environment,$(origin DEVICE)),$(DEVICE),cuda)

gpu-check: $(if $(filter $(PY),$(GPU_PY)),$(BENCH_STAMP))
	$(GPU_PY) benchmarks/gpu_check.py --device $(GPU_DEVICE) --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache build *.egg-info
