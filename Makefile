# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
POLICY ?= policies/mnist-mixed.yaml
OUT    ?= runs/demo

.PHONY: demo test lint typecheck bench clean venv docs

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
	$(VENV)/bin/harden run $(POLICY) --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check harden tests examples benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check harden tests examples benchmarks
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(PY) -m harden.docs

bench: $(STAMP)
	$(PY) benchmarks/attacks.py
	$(PY) benchmarks/iwd_cost.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache build *.egg-info
