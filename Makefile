# The two commands: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; GPU users can pre-install their own build in .venv (or set TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The main job: the seeds-debate head-to-head (with its dense compute ladder) on the built-in stdlib corpus, two seeds
# so that differences come with paired intervals, two runs at a time on one thread each; about 9 minutes on 2 CPU
# cores. Rerunning resumes: finished runs are skipped.
demo: $(STAMP)
	$(BIN)/smoe compare --suite seeds-debate --data stdlib --seeds 2 --steps 60 --batch-size 8 --seq-len 128 \
		--eval-every 15 --eval-batches 4 --checkpoints 2 --jobs 2 --out runs/demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
