# The two commands: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch's CPU build, asked for by name: on Linux the public index's torch==2.13.0 is the CUDA build (several GB).
# pip finds the +cpu wheel in a local wheel directory (find-links) or in PyTorch's CPU index, which TORCH_INDEX adds:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu
# A GPU user installs their own torch into .venv before the first make (an installed torch is kept) or sets
# TORCH_SPEC, e.g. TORCH_SPEC=torch==2.13.0.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# A developer's lane: everything but the tests marked slow (whole suites, kill-and-resume, the live server, the
# lower-instruction-set rebuilds) and those that start processes on torch.distributed.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiprocess"

# The main job, the head-to-head protocol end to end on the built-in `demo` suite (DeepSeekMoE against dense with the
# dense ladder, 4 seeds) and the stdlib corpus, two runs at a time on one thread each (its time and disk: README.md,
# "The two commands"). Rerunning resumes: finished runs are skipped.
demo: $(STAMP)
	$(BIN)/smoe compare --suite demo --data stdlib --steps 60 --batch-size 8 --seq-len 128 \
		--eval-every 15 --eval-batches 4 --val-tokens 16384 --jobs 2 --out runs/demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
