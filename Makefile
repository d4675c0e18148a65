# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
MINUTES ?= 5

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet 'torch==2.13.0'  # the CPU wheel here; torch's own index has the build for other machines
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flashlm demo --minutes $(MINUTES) --out runs/demo $(if $(DATA),--data $(DATA),)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The short benchmarks run here; the long ones (a quarter of an hour to an hour each) are listed with the
# command that runs each. docs/benchmarks.md holds every current figure and its goal.
bench: $(STAMP)
	$(BIN)/python bench/nsp_ceiling.py
	$(BIN)/python bench/data_prepare.py --workers 1 2
	@echo "Long benchmarks, one at a time (each writes bench/results/ and its docs/benchmarks.md section):"
	@echo "  $(BIN)/python bench/distill.py                    # ~20 min"
	@echo "  $(BIN)/python bench/longrange.py --minutes 16     # ~30 min"
	@echo "  $(BIN)/python bench/objectives.py --steps 500     # ~30 min a batch of variants"
	@echo "  $(BIN)/flashlm eval translate --minutes 30 --beam 4 --threads 2 --out bench/results \\"
	@echo "      --train-src D/train.en.gz --train-tgt D/train.de.gz --eval-src D/val.en.gz --eval-tgt D/val.de.gz  # ~35 min, D: Multi30k"
	@echo "  OMP_NUM_THREADS=1 $(BIN)/flashlm eval babi --per-task --jobs 2 --threads 2 --minutes 56 --out bench/results  # ~1 h"
	@echo "With llama-cpp-python installed apart (its docstring says how; ~10 min to build):"
	@echo "  $(BIN)/python bench/gguf_llama_cpp.py --site DIR  # ~2 min, DIR: its site-packages"

clean:
	rm -rf $(VENV) runs .pytest_cache
